"""The featurizer contract and the caches the featurizers share."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fms.errors import FMSError


class Featurizer(nn.Module):
    """Maps modules (architecture + weights) to embeddings, differentiably in the featurizer's own parameters.

    Subclasses implement :meth:`forward`. The weights of the given modules are inputs (read detached, never
    trained). Whatever does not depend on the featurizer's parameters is cached: by architecture, and by ``keys``
    when the caller gives them (a key must identify one fixed set of weights).

    Attributes:
        embedding_dim: Size ``d`` of the embedding.
    """

    embedding_dim: int

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        if int(embedding_dim) < 1:
            raise FMSError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
        self.embedding_dim = int(embedding_dim)
        # follows .to()/.double()/.cuda(), so lazily created layers and cached inputs land on the right device/dtype
        self.register_buffer("_ref", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        """Device of the featurizer's parameters."""
        return self._ref.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the featurizer's parameters."""
        return self._ref.dtype

    def forward(self, modules: Sequence[nn.Module], keys: Sequence[Hashable] | None = None) -> Tensor:
        """Embed modules.

        Args:
            modules: ``B`` modules, of any (mixed) architectures the featurizer supports.
            keys: Optional hashable key per module identifying its weights, for caching.

        Returns:
            Shape ``[B, embedding_dim]``, on the featurizer's device and dtype.
        """
        raise NotImplementedError

    def prepare(self, modules: Sequence[nn.Module]) -> None:
        """Create parameters whose size depends on the modules (FLAT, NFN); a no-op for the others.

        Call it (or run one forward) before building an optimiser over ``parameters()``.
        """

    def clear_cache(self) -> None:
        """Forget cached inputs (not the architecture topologies, which are process-wide)."""

    @staticmethod
    def _check_keys(modules: Sequence[nn.Module], keys: Sequence[Hashable] | None) -> None:
        if keys is not None and len(keys) != len(modules):
            raise FMSError(f"got {len(keys)} keys for {len(modules)} modules")


def tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors in a (nested) tuple/list/dict."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


class ByteLRU:
    """A thread-safe LRU mapping bounded by the bytes of the tensors it holds (and optionally by item count)."""

    def __init__(self, max_bytes: int, max_items: int | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.max_items = max_items
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        """The value under ``key`` (marked recently used), or ``None``."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` (dropping least recently used entries beyond the budget)."""
        size = tensor_bytes(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._items and (
                self._bytes > self.max_bytes or (self.max_items is not None and len(self._items) > self.max_items)
            ):
                _, (_, s) = self._items.popitem(last=False)
                self._bytes -= s

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes of tensors held."""
        return self._bytes
