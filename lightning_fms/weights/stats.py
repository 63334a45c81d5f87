"""STATS featurizer (Unterthiner et al. 2020): per-tensor quantiles, mean and std, then a trainable projection."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor, nn

from lightning_fms.errors import FMSError
from lightning_fms.weights._stats import NUM_STATS, tensor_stats
from lightning_fms.weights.base import ByteLRU, Featurizer

#: Features per selected tensor: the 7 statistics, ``log(1 + numel)`` and a presence flag.
FEATURES_PER_TENSOR = NUM_STATS + 2


class StatsFeaturizer(Featurizer):
    """Statistics of a fixed number of tensors -> ``Linear`` -> embedding; works for any architecture.

    For each of ``num_tensors`` tensors (parameters in registration order, plus floating buffers if asked) the
    features are the 0/25/50/75/100 % quantiles, the mean and the std of its values, ``log(1 + numel)`` and a
    presence flag. Networks with fewer tensors are zero-padded; with more, ``selection="first"`` keeps the first
    ``num_tensors`` and ``selection="spread"`` keeps ``num_tensors`` evenly spaced ones (input to output).

    Args:
        embedding_dim: Output size ``d``.
        num_tensors: Number of tensors described.
        selection: ``"first"`` or ``"spread"``.
        include_buffers: Also describe floating-point buffers (BatchNorm running statistics).
        value_cache_bytes: Budget of the cache of features by key.
    """

    def __init__(
        self,
        embedding_dim: int = 32,
        num_tensors: int = 16,
        selection: str = "first",
        include_buffers: bool = False,
        value_cache_bytes: int = 1 << 26,
    ) -> None:
        super().__init__(embedding_dim)
        if selection not in ("first", "spread"):
            raise FMSError(f"selection must be 'first' or 'spread', got {selection!r}")
        if int(num_tensors) < 1:
            raise FMSError(f"num_tensors must be positive, got {num_tensors!r}")
        self.num_tensors = int(num_tensors)
        self.selection = selection
        self.include_buffers = bool(include_buffers)
        self.proj = nn.Linear(self.num_tensors * FEATURES_PER_TENSOR, self.embedding_dim)
        self._values = ByteLRU(value_cache_bytes)

    def clear_cache(self) -> None:
        """Forget the cached inputs."""
        self._values.clear()

    def features(self, module: nn.Module) -> Tensor:
        """The statistics features of one module (detached), shape ``[num_tensors * 9]``."""
        tensors = [p.detach() for p in module.parameters()]
        if self.include_buffers:
            tensors += [b.detach() for b in module.buffers() if b.is_floating_point()]
        tensors = [t for t in tensors if t.numel() > 0]
        n = len(tensors)
        if n > self.num_tensors:
            if self.selection == "first":
                tensors = tensors[: self.num_tensors]
            else:
                idx = torch.linspace(0, n - 1, self.num_tensors).round().long().tolist()
                tensors = [tensors[i] for i in idx]
        out = torch.zeros(self.num_tensors, FEATURES_PER_TENSOR, dtype=torch.float64)
        for i, t in enumerate(tensors):
            out[i, :NUM_STATS] = tensor_stats(t.double() if t.numel() < (1 << 20) else t.float()).double().cpu()
            out[i, NUM_STATS] = math.log1p(t.numel())
            out[i, NUM_STATS + 1] = 1.0
        return out.reshape(-1)

    def forward(
        self,
        modules: Sequence[nn.Module],
        keys: Sequence[Hashable] | None = None,
        references: Sequence[nn.Module] | None = None,
    ) -> Tensor:
        """Embed modules (see :meth:`Featurizer.forward`), shape ``[B, embedding_dim]``; ``references`` are unused."""
        self._check_keys(modules, keys)
        if len(modules) == 0:
            return self._ref.new_zeros(0, self.embedding_dim)
        rows = []
        for i, module in enumerate(modules):
            key = keys[i] if keys is not None else None
            feats = self._values.get(key) if key is not None else None
            if feats is None:
                feats = self.features(module)
                if key is not None:
                    self._values.put(key, feats)
            rows.append(feats)
        return self.proj(torch.stack(rows).to(self.device, self.dtype))
