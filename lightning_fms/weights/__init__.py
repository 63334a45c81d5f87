"""Checkpoint featurizers: embed a trial's weights for the surrogate.

``build_featurizer(name, **options)`` with ``name`` in :data:`FEATURIZERS` returns a :class:`Featurizer` (an
``nn.Module`` with ``embedding_dim`` and ``forward(modules, keys=None) -> [B, embedding_dim]``):

* ``"gmn"``: graph metanetwork on traced parameter graphs (:class:`ParameterGraph`); any traceable architecture,
  mixed architectures in one batch, invariant to neuron permutations.
* ``"nfn"``: permutation-equivariant neural functional (package ``nfn``) for MLP/CNN chains; other
  architectures are embedded from per-tensor statistics (one warning each) unless ``fallback=False``.
* ``"flat"``: flattened weights and an MLP per architecture, real-permutation augmentation.
* ``"stats"``: per-tensor statistics and a linear projection; any architecture, cheapest.
"""

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
from lightning_fms.weights.topology import GraphTopology

__all__ = [
    "EDGE_STATIC_FEATURES",
    "FEATURIZERS",
    "NODE_STATIC_FEATURES",
    "NODE_VALUE_FEATURES",
    "TOPOLOGY_CACHE",
    "EdgeType",
    "Featurizer",
    "FlatFeaturizer",
    "GMNFeaturizer",
    "GraphTopology",
    "NFNFeaturizer",
    "NodeType",
    "ParameterGraph",
    "StatsFeaturizer",
    "architecture_signature",
    "build_featurizer",
    "permute_hidden_units",
]
