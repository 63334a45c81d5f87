"""Per-tensor weight statistics (Unterthiner et al. 2020), shared by the graph fallback and the STATS featurizer."""

from __future__ import annotations

import torch
from torch import Tensor

#: The statistics computed per tensor (or per column), in this order.
STAT_NAMES: tuple[str, ...] = ("q0", "q25", "q50", "q75", "q100", "mean", "std")
NUM_STATS = len(STAT_NAMES)

_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
# Quantiles of tensors larger than this are taken on a deterministic strided subsample (sorting 10^7+ values
# per call would dominate the cost of a cold embedding; the subsample changes the statistics by ~1e-3).
_MAX_SORT = 1 << 20


def column_stats(x: Tensor) -> Tensor:
    """Statistics of every column of a matrix.

    Args:
        x: Values, shape ``[m, n]`` (``m >= 1``); any floating dtype.

    Returns:
        Shape ``[n, 7]``: the 0/25/50/75/100 % quantiles (linear interpolation), the mean and the population
        standard deviation of each column, in ``x``'s dtype.
    """
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    m = x.shape[0]
    mean = x.mean(0)
    std = x.std(0, unbiased=False) if m > 1 else torch.zeros_like(mean)
    if m * x.shape[1] > _MAX_SORT and m > 1:
        step = -(-m * x.shape[1] // _MAX_SORT)
        x = x[::step]
        m = x.shape[0]
    s = x.sort(0).values
    pos = torch.tensor(_QUANTILES, dtype=torch.float64) * (m - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = (pos - lo).to(s.dtype).unsqueeze(1)
    q = s[lo] + (s[hi] - s[lo]) * frac  # [5, n]
    return torch.cat([q, mean.unsqueeze(0), std.unsqueeze(0)], 0).t().contiguous()


def tensor_stats(t: Tensor) -> Tensor:
    """Statistics of all the values of one tensor.

    Args:
        t: Any tensor with at least one element.

    Returns:
        Shape ``[7]``: see :func:`column_stats`.
    """
    return column_stats(t.detach().reshape(-1, 1))[0]
