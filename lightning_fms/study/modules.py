"""The featurizer's modules: the network behind each weight key, the same for the tuner and for agents.

A weight featurizer reads modules (architecture and weights), not bare tensors. :class:`StudyModules` gives the
module of a weight key (:mod:`lightning_fms.search.rows`):

* ``("hub", entry)``: the hub entry's network with its pretrained weights, ``W_0``, from a ``pretrained``
  callable (the tuner's executor's ``pretrained_module``; an agent's model hub);
* ``("trial", id, epoch)``: a fresh copy of the trial's entry network with the study's snapshot of that epoch
  loaded (:class:`~lightning_fms.study.snapshots.WeightSnapshots`), whoever trained the epoch: the tuner's
  executor, or the user's script under ``lightning-fms agent``, whose callback wrote the weights.

:meth:`StudyModules.store_pretrained` keeps each entry's ``W_0`` in the snapshots once, described, so the study
directory alone gives every snapshot's features against its run's ``W_0``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from lightning_fms.errors import FMSError
from lightning_fms.hub import ModelHub
from lightning_fms.search.rows import WeightKey
from lightning_fms.search.space import SearchSpace
from lightning_fms.study.snapshots import WeightSnapshots, module_description

__all__ = ["StudyModules"]


class StudyModules:
    """The module (architecture + weights) of a weight key, built once and cached; a ``ModuleProvider``.

    Modules are returned in eval mode without gradients; the featurizer must not change them.

    Args:
        space: The search space (its hub choice names a configuration's entry).
        pretrained: ``pretrained(entry) -> network`` with the entry's pretrained weights (a fresh module per
            call), or ``None`` when there is no hub (``entry`` is ``None`` without a hub choice).
        snapshots: The study's weight snapshots (a trial key's weights are read from there).
    """

    def __init__(
        self,
        space: SearchSpace,
        pretrained: Callable[[str | None], nn.Module | None],
        snapshots: WeightSnapshots,
    ) -> None:
        self.space = space
        self.pretrained = pretrained
        self.snapshots = snapshots
        self._modules: dict[WeightKey, nn.Module] = {}

    def __call__(self, key: WeightKey, config: Mapping[str, Any]) -> nn.Module:
        """The module behind ``key`` (its configuration ``config`` names the hub entry).

        Raises:
            FMSError: there is no hub to build a network from.
            KeyError: a trial key whose snapshot the study does not hold.
        """
        if key in self._modules:
            return self._modules[key]
        entry = config.get(self.space.hub_key) if self.space.hub_key else None
        module = self.pretrained(entry)
        if module is None:
            raise FMSError("weight featurizers need a model hub (the space has no hub choice)")
        if key[0] == "trial":
            module.load_state_dict(self.snapshots.get(key))
        module.eval().requires_grad_(False)
        self._modules[key] = module
        return module

    def store_pretrained(self, hub: ModelHub | None) -> None:
        """Keep each hub entry's pretrained weights (``W_0``) once in the snapshots, as ``("hub", entry)``.

        The file's metadata describes the module (:func:`~lightning_fms.study.snapshots.module_description`,
        with the entry's weights-file SHA-256 when ``hub`` knows it). Entries already kept are skipped; nothing
        to do without a hub choice.
        """
        if self.space.hub_key is None:
            return
        names = set(hub.names) if hub is not None else set()
        for entry in getattr(self.space[self.space.hub_key], "choices", ()):
            key = ("hub", str(entry))
            if key in self.snapshots:
                continue
            module = self(key, {self.space.hub_key: entry})
            sha256 = hub.entry(str(entry)).sha256 if hub is not None and str(entry) in names else None
            self.snapshots.put(key, module.state_dict(), description=module_description(module, sha256))
