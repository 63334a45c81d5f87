"""The featurizer contract and the caches the featurizers share."""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_fms.errors import FMSError

if TYPE_CHECKING:
    from lightning_fms.weights.graph import GraphTopology


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


def signatures_to_tensor(signatures: Sequence[str]) -> Tensor:
    """Architecture signatures (hex digests of equal length) as a ``[n, bytes]`` uint8 tensor, for a state dict.

    Featurizers with per-architecture parts store which architecture each part belongs to this way, so a fresh
    featurizer can rebuild and re-attach them from a state dict of tensors.
    """
    if not signatures:
        return torch.zeros(0, 20, dtype=torch.uint8)
    return torch.tensor([list(bytes.fromhex(s)) for s in signatures], dtype=torch.uint8)


def tensor_to_signatures(value: Tensor) -> list[str]:
    """The signatures stored by :func:`signatures_to_tensor`."""
    return [bytes(row).hex() for row in value.detach().cpu().to(torch.uint8).tolist()]


def topology_quietly(module: nn.Module) -> GraphTopology:
    """``TOPOLOGY_CACHE.get(module, GraphOptions())`` without its statistics-fallback notice.

    The notice says the module is embedded from per-tensor statistics, which is only true for the graph
    featurizers; a featurizer that reads the topology for something else gives its own warning instead. Other
    warnings raised meanwhile are passed on.
    """
    from lightning_fms.weights.graph import TOPOLOGY_CACHE, GraphOptions

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        topo = TOPOLOGY_CACHE.get(module, GraphOptions())
    for w in caught:
        if topo.fallback and str(w.message).startswith("lightning_fms.weights:"):
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return topo


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
