"""Weight snapshots: the CPU copies of each trial's weights after each epoch, for the featurizer.

Keys are ``("hub", entry_name)`` for an entry's pretrained weights and ``("trial", id, epoch)`` for
the weights after ``epoch`` of a trial (``epoch == 0`` means the pretrained weights it started from).
Snapshots live in memory and, when a directory is given, as one safetensors file each, so a resumed
study finds them again. Nothing is ever unpickled.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lightning_fms.atomic import atomic_output
from lightning_fms.errors import CheckpointError

SnapshotKey = tuple[Hashable, ...]


def _file_name(key: SnapshotKey) -> str:
    return "-".join(str(part) for part in key) + ".safetensors"


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

    def put(self, key: SnapshotKey, state: dict[str, torch.Tensor]) -> None:
        """Store a snapshot (tensors are copied to contiguous CPU memory)."""
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        if self.directory is not None:
            with atomic_output(self.directory / _file_name(key)) as tmp:
                save_file(state, str(tmp))
        self._known.add(key)
        self._remember(key, state)

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
