"""How edge and node values are read from a module's tensors: kernel grids and value specs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


def kernel_to_grid(w: Tensor, grid: tuple[int, int]) -> Tensor:
    """Map kernels onto the fixed kernel grid.

    Args:
        w: Kernels, shape ``[N, *k]`` with 0 to 3 spatial dimensions (0: scalars).
        grid: ``(Kh, Kw)``.

    Returns:
        Shape ``[N, Kh * Kw]``: each kernel centred in the grid with zero padding (1-d kernels in the middle row,
        3-d kernels folded to ``(kd * kh, kw)``), average-pooled along any dimension larger than the grid.
    """
    n = w.shape[0]
    gh, gw = grid
    if w.dim() == 1:
        w = w.reshape(n, 1, 1)
    elif w.dim() == 2:
        w = w.reshape(n, 1, w.shape[1])
    elif w.dim() > 3:
        w = w.reshape(n, -1, w.shape[-1])
    kh, kw = w.shape[1], w.shape[2]
    if kh == gh and kw == gw:
        return w.reshape(n, gh * gw)
    ph, pw = max(gh - kh, 0), max(gw - kw, 0)
    if ph or pw:
        w = F.pad(w, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    if w.shape[1] > gh or w.shape[2] > gw:
        w = F.adaptive_avg_pool2d(w.unsqueeze(1), (gh, gw)).squeeze(1)
    return w.reshape(n, gh * gw)


def vector_to_grid(w: Tensor, numel: int) -> Tensor:
    """Map flat vectors (flattened spatial positions) onto ``numel`` slots.

    Args:
        w: Shape ``[N, k]``.
        numel: Number of slots ``Kh * Kw``.

    Returns:
        Shape ``[N, numel]``: centred with zero padding when ``k <= numel``, else average-pooled to ``numel``.
    """
    k = w.shape[1]
    if k == numel:
        return w
    if k < numel:
        pad = numel - k
        return F.pad(w, (pad // 2, pad - pad // 2))
    return F.adaptive_avg_pool1d(w.unsqueeze(1), numel).squeeze(1)


@dataclass(frozen=True)
class EdgeValueSpec:
    """How to read the values of one contiguous block of edges.

    Attributes:
        count: Number of edges in the block.
        name: Tensor name in the module's state, or ``None`` for constant edges.
        kind: ``"const"``, ``"kernel"`` (``W`` as ``[out, in_per_group, *k]``), ``"flat"`` (``W`` as
            ``[out, C * k]``) or ``"transpose"`` (``W`` stored ``[in, out / groups, *k]``: transposed
            convolutions and ``x @ W``).
        rows: Optional ``(start, stop)`` slice of the tensor's first dimension (attention ``in_proj``).
        groups: Convolution groups (``"transpose"`` only).
        flat_k: Positions per channel (``"flat"``), and ``flat_layout`` ``"major"`` (index ``c * k + r``) or
            ``"minor"`` (index ``r * C + c``).
        value: Constant edge value (``"const"``).
    """

    count: int
    name: str | None
    kind: str
    rows: tuple[int, int] | None = None
    groups: int = 1
    flat_k: int = 1
    flat_layout: str = "major"
    value: float = 1.0

    def read(self, tensors: Mapping[str, Tensor], grid: tuple[int, int], like: Tensor) -> Tensor:
        """Return the block's kernel vectors, shape ``[count, Kh * Kw]``."""
        numel = grid[0] * grid[1]
        if self.kind == "const":
            out = like.new_zeros(self.count, numel)
            out[:, (grid[0] // 2) * grid[1] + grid[1] // 2] = self.value
            return out
        assert self.name is not None
        w = tensors[self.name].detach()
        if self.rows is not None:
            w = w[self.rows[0] : self.rows[1]]
        if self.kind == "transpose":
            g = self.groups
            w = w.reshape(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2)
            w = w.reshape(w.shape[0] * w.shape[1], *w.shape[2:])
        if self.kind == "flat":
            out_f = w.shape[0]
            c = w.shape[1] // self.flat_k
            if self.flat_layout == "major":
                w = w.reshape(out_f * c, self.flat_k)
            else:
                w = w.reshape(out_f, self.flat_k, c).transpose(1, 2).reshape(out_f * c, self.flat_k)
            return vector_to_grid(w, numel)
        w = w.reshape(w.shape[0] * w.shape[1], *w.shape[2:])
        return kernel_to_grid(w, grid)


@dataclass(frozen=True)
class NodeValueSpec:
    """How to read node values from one tensor.

    Attributes:
        name: Tensor name.
        nodes: Node ids written, shape ``[n]``.
        kind: ``"vector"`` (the tensor, or its ``rows`` slice, holds one value per node, written to ``column``),
            ``"colstats"`` (per-node statistics of the tensor's slices along ``axis``, written to the statistics
            columns; a tensor without that axis gives every node the whole tensor's statistics) or ``"stats"``
            (one node gets the whole tensor's statistics).
        column: Index into :data:`NODE_VALUE_FEATURES` (``"vector"``).
        rows: Optional ``(start, stop)`` slice of the flattened tensor (``"vector"``).
        axis: Feature axis of the tensor (``"colstats"``), or ``None`` for whole-tensor statistics.
        scale: Multiplier applied to ``"vector"`` values (``-1`` for subtracted parameters).
    """

    name: str
    nodes: Tensor
    kind: str
    column: int = 0
    rows: tuple[int, int] | None = None
    axis: int | None = None
    scale: float = 1.0
