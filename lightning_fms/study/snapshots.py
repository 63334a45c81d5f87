"""Weight snapshots: the CPU copies of each trial's weights after each epoch, for the featurizer.

Keys are ``("hub", entry_name)`` for an entry's pretrained weights and ``("trial", id, epoch)`` for
the weights after ``epoch`` of a trial (``epoch == 0`` means the pretrained weights it started from).
Snapshots live in memory and, when a directory is given, as one safetensors file each, so a resumed
study finds them again. Nothing is ever unpickled.

A hub entry's snapshot also describes its module in the file's metadata (:func:`module_description`): which of
its tensors are parameters, in ``named_parameters`` order, which are floating buffers, and the SHA-256 of the
entry's weights file. A trial's snapshot is a ``state_dict`` of the same architecture, so with it a study
directory alone gives the features a featurizer computes of any snapshot against its run's ``W_0``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_fms.atomic import atomic_output
from lightning_fms.errors import CheckpointError, one_line

SnapshotKey = tuple[Hashable, ...]

#: The one safetensors metadata key of a described snapshot (one key: the file's bytes do not depend on key order).
DESCRIPTION_KEY = "lightning_fms.module"


def module_description(module: nn.Module, sha256: str | None = None) -> dict[str, Any]:
    """What a snapshot of ``module``'s ``state_dict`` needs beside its tensors to be read as the module.

    Args:
        module: The module (a hub entry's network with its pretrained weights).
        sha256: Hex SHA-256 of the weights file it was loaded from, when known.

    Returns:
        ``{"parameters": [...], "floating_buffers": [...], "sha256": "..."}``: the names of its parameters in
        ``named_parameters`` order (shared ones once), of its floating-point buffers in ``named_buffers`` order,
        and ``sha256`` (``""`` when unknown).
    """
    return {
        "parameters": [name for name, _ in module.named_parameters()],
        "floating_buffers": [name for name, b in module.named_buffers() if b.is_floating_point()],
        "sha256": str(sha256 or ""),
    }


def _file_name(key: SnapshotKey) -> str:
    """The file of a key: ``trial-3-2.safetensors``, ``hub-cnn-s.safetensors``.

    The parts are joined by ``-``, each percent-encoded where it is not a letter, digit or one of ``_.-~`` (a hub
    entry named by a weights file's path stays one file in the folder).
    """
    return "-".join(quote(str(part), safe="") for part in key) + ".safetensors"


class WeightSnapshots:
    """A store of ``state_dict`` copies keyed by :data:`SnapshotKey`.

    Args:
        directory: Where snapshots are written (created if missing); ``None`` keeps them in memory only.
        max_in_memory: How many snapshots stay loaded (least recently used are dropped; they stay on disk).
    """

    def __init__(self, directory: str | Path | None = None, max_in_memory: int = 4096) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_in_memory = max_in_memory
        self._cache: OrderedDict[SnapshotKey, dict[str, torch.Tensor]] = OrderedDict()
        self._known: set[SnapshotKey] = set()
        self._descriptions: dict[SnapshotKey, dict[str, Any]] = {}

    def put(
        self, key: SnapshotKey, state: dict[str, torch.Tensor], description: Mapping[str, Any] | None = None
    ) -> None:
        """Store a snapshot (tensors are copied to contiguous CPU memory).

        Args:
            key: Its key.
            state: The tensors.
            description: JSON data stored with it in the file's metadata (:func:`module_description`).
        """
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        if self.directory is not None:
            metadata = {DESCRIPTION_KEY: json.dumps(dict(description), sort_keys=True)} if description else None
            with atomic_output(self.directory / _file_name(key)) as tmp:
                save_file(state, str(tmp), metadata=metadata)
        if description:
            self._descriptions[key] = json.loads(json.dumps(dict(description)))
        self._known.add(key)
        self._remember(key, state)

    def path(self, key: SnapshotKey) -> Path | None:
        """The file of ``key``'s snapshot (``None`` for an in-memory store); it may not exist."""
        return self.directory / _file_name(key) if self.directory is not None else None

    def description(self, key: SnapshotKey) -> dict[str, Any] | None:
        """The description stored with ``key``'s snapshot, or ``None`` when it has none.

        Raises:
            KeyError: no such snapshot.
            CheckpointError: its file is unreadable or its description is not JSON.
        """
        if key in self._descriptions:
            return self._descriptions[key]
        path = self.path(key)
        if path is None or not path.exists():
            if key in self._known:
                return None
            raise KeyError(key)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                text = (handle.metadata() or {}).get(DESCRIPTION_KEY)
            described = json.loads(text) if text is not None else None
        except Exception as error:  # safetensors raises several types for corrupt headers
            raise CheckpointError(f"weight snapshot {path} is unreadable: {one_line(error)}") from None
        if described is not None and not isinstance(described, dict):
            raise CheckpointError(f"weight snapshot {path} has a description that is not a mapping")
        if described is not None:
            self._descriptions[key] = described
        return described

    def __contains__(self, key: object) -> bool:
        if key in self._known:
            return True
        return self.directory is not None and isinstance(key, tuple) and (self.directory / _file_name(key)).exists()

    def get(self, key: SnapshotKey) -> dict[str, torch.Tensor]:
        """The snapshot stored under ``key``.

        Raises:
            KeyError: no such snapshot.
            CheckpointError: its file is unreadable.
        """
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if self.directory is None or not (self.directory / _file_name(key)).exists():
            raise KeyError(key)
        path = self.directory / _file_name(key)
        try:
            state = load_file(str(path))
        except Exception as error:  # safetensors raises several types for corrupt headers
            raise CheckpointError(f"weight snapshot {path} is unreadable: {error}") from None
        self._known.add(key)
        self._remember(key, state)
        return state

    def _remember(self, key: SnapshotKey, state: dict[str, torch.Tensor]) -> None:
        self._cache[key] = state
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_in_memory:
            self._cache.popitem(last=False)
