"""The featurizer contract and the caches the featurizers share."""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_fms.errors import FMSError

if TYPE_CHECKING:
    from lightning_fms.weights.topology import GraphTopology

#: Values of ``trainable`` for the featurizers split into a trunk and a readout (GMN, NFN, FLAT).
TRAINABLE = ("all", "readout", "auto")


def check_trainable(trainable: str) -> str:
    """``trainable`` if it is one of :data:`TRAINABLE`, else a one-line :class:`FMSError`."""
    if trainable not in TRAINABLE:
        raise FMSError(f"trainable must be 'all', 'readout' or 'auto', got {trainable!r}")
    return trainable


class Featurizer(nn.Module):
    """Maps modules (architecture + weights) to embeddings, differentiably in the featurizer's own parameters.

    Subclasses implement :meth:`forward`. The weights of the given modules are inputs (read detached, never
    trained). Whatever does not depend on the featurizer's parameters is cached: by architecture, and by ``keys``
    when the caller gives them (a key must identify one fixed set of weights).

    Featurizers made of a trunk and a small readout (GMN, NFN, FLAT) take ``trainable``: ``"all"`` trains every
    parameter; ``"readout"`` keeps the trunk at its seeded initialisation (``requires_grad`` off) and caches its
    output per key in a :class:`TrunkCache`, so a training step costs the readout only; ``"auto"`` means ``"all"``
    on a GPU and ``"readout"`` elsewhere (:attr:`effective_trainable`). They override
    :meth:`is_readout_parameter`, call :meth:`_apply_trainable` whenever parameters appear and
    :meth:`_sync_trainable` in every forward (the device may have changed), and drop their trunk cache when
    :meth:`_trunk_state_changes` says a state dict changes the trunk.

    Attributes:
        embedding_dim: Size ``d`` of the embedding.
        trainable: ``"all"``, ``"readout"`` or ``"auto"`` (``"all"`` for featurizers without a readout mode).
    """

    embedding_dim: int
    trainable: str = "all"

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

    def forward(
        self,
        modules: Sequence[nn.Module],
        keys: Sequence[Hashable] | None = None,
        references: Sequence[nn.Module] | None = None,
    ) -> Tensor:
        """Embed modules.

        Args:
            modules: ``B`` modules, of any (mixed) architectures the featurizer supports.
            keys: Optional hashable key per module identifying its weights, for caching.
            references: Optional ``B`` modules: the weights each run started from (``W_0``, the hub entry's
                pretrained module; of the same architecture as its module). Featurizers that do not read them
                ignore them.

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

    @property
    def effective_trainable(self) -> str:
        """``"all"`` or ``"readout"``: what ``trainable`` means on the device the featurizer is on now."""
        if self.trainable != "auto":
            return self.trainable
        return "all" if self._ref.device.type == "cuda" else "readout"

    def is_readout_parameter(self, name: str) -> bool:
        """Whether the parameter ``name`` (as in ``named_parameters()``) is trained with ``trainable="readout"``."""
        return True

    def _apply_trainable(self) -> None:
        """Freeze the trunk when the effective mode is ``"readout"``, unfreeze it when ``"auto"`` now means ``"all"``.

        With ``trainable="all"`` nothing is touched. Call it when parameters are created.
        """
        if self.trainable == "all":
            return
        mode = self.effective_trainable
        for name, p in self.named_parameters():
            if not self.is_readout_parameter(name):
                p.requires_grad_(mode == "all")
        self._applied_trainable = mode

    def _sync_trainable(self) -> None:
        """:meth:`_apply_trainable` if the effective mode changed since (a device move); cheap, for every forward."""
        if self.trainable != "all" and getattr(self, "_applied_trainable", None) != self.effective_trainable:
            self._apply_trainable()

    def _trunk_state_changes(self, state_dict: Mapping[str, Any], prefix: str) -> bool:
        """Whether loading ``state_dict`` changes a trunk parameter (so cached trunk outputs become stale).

        Call it from ``_load_from_state_dict`` before any part is rebuilt: each trunk parameter is compared, by
        name, with its value in the state (after conversion to the parameter's device and dtype, as loading does).
        A trunk parameter missing from the state keeps its value. The surrogate reloads the featurizer's initial
        state before every full fit, which leaves a frozen trunk as it is: its cached outputs stay valid.
        """
        for name, p in self.named_parameters():
            if self.is_readout_parameter(name):
                continue
            value = state_dict.get(prefix + name)
            if value is None:
                continue
            if not isinstance(value, Tensor) or value.shape != p.shape:
                return True
            if not torch.equal(value.to(p.device, p.dtype), p.detach()):
                return True
        return False

    @staticmethod
    def _check_keys(
        modules: Sequence[nn.Module],
        keys: Sequence[Hashable] | None,
        references: Sequence[nn.Module] | None = None,
    ) -> None:
        if keys is not None and len(keys) != len(modules):
            raise FMSError(f"got {len(keys)} keys for {len(modules)} modules")
        if references is not None and len(references) != len(modules):
            raise FMSError(f"got {len(references)} references for {len(modules)} modules")


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


def inverse_order(batches: Sequence[Sequence[int]], device: torch.device | str) -> Tensor | None:
    """Where each position went when a batch was split into ``batches`` (lists of positions), concatenated.

    Returns:
        ``inverse [B]`` with ``torch.cat(per_batch_rows)[inverse]`` in the original order, or ``None`` when the
        concatenation already is (see :func:`gather_rows`).
    """
    order = [i for batch in batches for i in batch]
    if order == list(range(len(order))):
        return None
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return inverse.to(device)


def gather_rows(parts: Sequence[Tensor], inverse: Tensor | None) -> Tensor:
    """Rows computed per batch (``[b_i, d]`` each) back in the original order, shape ``[B, d]``."""
    out = parts[0] if len(parts) == 1 else torch.cat(list(parts))
    return out if inverse is None else out.index_select(0, inverse)


def topology_quietly(module: nn.Module) -> GraphTopology:
    """``TOPOLOGY_CACHE.get(module, GraphOptions())`` without its statistics-fallback notice.

    The notice says the module is embedded from per-tensor statistics, which is only true for the graph
    featurizers; a featurizer that reads the topology for something else gives its own warning instead. Other
    warnings raised meanwhile are passed on.
    """
    from lightning_fms.weights.graph import TOPOLOGY_CACHE
    from lightning_fms.weights.schema import GraphOptions

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

    def __deepcopy__(self, memo: dict[int, Any]) -> ByteLRU:
        """The cache itself: a deep copy of its holder (a surrogate copied to refit in another thread) shares it.

        It is thread-safe, and its values are inputs derived from weights, not learned state.
        """
        return self

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


class TrunkCache(ByteLRU):
    """Outputs of a frozen trunk (``trainable="readout"``), one row per ``(key, device, dtype)``.

    A key identifies one fixed set of weights (see :class:`Featurizer`) and the trunk does not change while its
    outputs are cached (its owner clears the cache when a state dict or training changes it), so a row is computed
    once per checkpoint.

    Attributes:
        batches: Whole batches (stacked rows, or what a featurizer builds from them) by the tuple of their keys,
            cleared with the rows, so that a training step over the same checkpoints only looks up one entry.
    """

    def __init__(self, max_bytes: int, max_batches: int = 8) -> None:
        super().__init__(max_bytes)
        self.batches = ByteLRU(max_bytes, max_items=max_batches)

    def clear(self) -> None:
        """Drop every row and batch."""
        super().clear()
        self.batches.clear()

    def rows(
        self,
        keys: Sequence[Hashable] | None,
        count: int,
        device: torch.device,
        dtype: torch.dtype,
        compute: Callable[[list[int]], Tensor],
        memo: bool = True,
    ) -> Tensor:
        """Trunk outputs of ``count`` modules: cached rows where their key has one, ``compute`` for the others.

        Args:
            keys: ``count`` keys, or ``None`` (nothing is cached).
            count: Number of modules ``B``.
            device: Device of the rows (part of the cache key).
            dtype: Dtype of the rows (part of the cache key).
            compute: Given the positions of the modules without a cached row, returns their trunk outputs, shape
                ``[len(positions), *F]``; it runs under ``torch.no_grad()``.
            memo: Also keep the stacked result in :attr:`batches` (``False`` for a caller that keeps its own).

        Returns:
            Shape ``[B, *F]`` (no autograd history; do not modify it in place, it may be shared).
        """
        batch_key = (tuple(keys), device, dtype) if keys is not None and memo else None
        if batch_key is not None:
            hit = self.batches.get(batch_key)
            if hit is not None:
                return hit
        rows: list[Tensor | None] = [None] * count
        todo: list[int] = []
        for i in range(count):
            hit = self.get((keys[i], device, dtype)) if keys is not None else None
            if hit is None:
                todo.append(i)
            rows[i] = hit
        if todo:
            with torch.no_grad():
                out = compute(todo)
            for j, i in enumerate(todo):
                rows[i] = out[j]
                if keys is not None:
                    self.put((keys[i], device, dtype), out[j].clone())
        stacked = torch.stack(rows)  # type: ignore[arg-type]
        if batch_key is not None:
            self.batches.put(batch_key, stacked)
        return stacked
