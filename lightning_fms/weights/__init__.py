"""Checkpoint featurizers: embed a trial's weights for the surrogate.

``build_featurizer(name, **options)`` with ``name`` in :data:`FEATURIZERS` returns a :class:`Featurizer` (an
``nn.Module`` with ``embedding_dim`` and ``forward(modules, keys=None, references=None) -> [B, embedding_dim]``):

* ``"gmn"``: graph metanetwork on traced parameter graphs (:class:`ParameterGraph`); any traceable architecture,
  mixed architectures in one batch, invariant to neuron permutations.
* ``"nfn"``: permutation-equivariant neural functional (package ``nfn``, the ``nfn`` extra) for MLP/CNN chains;
  other architectures are embedded from per-tensor statistics (one warning each) unless ``fallback=False``.
* ``"flat"``: flattened weights and an MLP per architecture, real-permutation augmentation.
* ``"stats"``: per-tensor statistics and a linear projection; any architecture, cheapest.
* ``"summary"``: 20 fixed statistics of the weights and of their change since the run's pretrained weights
  (``forward(..., references=W_0)``); any architecture, nothing trained.

The names load on first use, so reading :data:`FEATURIZERS` (the command line's choices) does not import
torch-geometric or the featurizers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_fms.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Featurizer": "lightning_fms.weights.base",
    "FlatFeaturizer": "lightning_fms.weights.flat",
    "GMNFeaturizer": "lightning_fms.weights.gmn",
    "EDGE_STATIC_FEATURES": "lightning_fms.weights.schema",
    "NODE_STATIC_FEATURES": "lightning_fms.weights.schema",
    "NODE_VALUE_FEATURES": "lightning_fms.weights.schema",
    "TOPOLOGY_CACHE": "lightning_fms.weights.graph",
    "EdgeType": "lightning_fms.weights.schema",
    "GraphTopology": "lightning_fms.weights.topology",
    "NodeType": "lightning_fms.weights.schema",
    "ParameterGraph": "lightning_fms.weights.graph",
    "architecture_signature": "lightning_fms.weights.graph",
    "NFNFeaturizer": "lightning_fms.weights.nfn",
    "permute_hidden_units": "lightning_fms.weights.permutation",
    "FEATURIZERS": "lightning_fms.weights.registry",
    "build_featurizer": "lightning_fms.weights.registry",
    "StatsFeaturizer": "lightning_fms.weights.stats",
    "SummaryFeaturizer": "lightning_fms.weights.summary",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from lightning_fms.weights.base import Featurizer
    from lightning_fms.weights.flat import FlatFeaturizer
    from lightning_fms.weights.gmn import GMNFeaturizer
    from lightning_fms.weights.graph import TOPOLOGY_CACHE, ParameterGraph, architecture_signature
    from lightning_fms.weights.nfn import NFNFeaturizer
    from lightning_fms.weights.permutation import permute_hidden_units
    from lightning_fms.weights.registry import FEATURIZERS, build_featurizer
    from lightning_fms.weights.schema import (
        EDGE_STATIC_FEATURES,
        NODE_STATIC_FEATURES,
        NODE_VALUE_FEATURES,
        EdgeType,
        NodeType,
    )
    from lightning_fms.weights.stats import StatsFeaturizer
    from lightning_fms.weights.summary import SummaryFeaturizer
    from lightning_fms.weights.topology import GraphTopology
