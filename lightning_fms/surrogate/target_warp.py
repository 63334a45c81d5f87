"""A monotone warp of the targets to normal scores, so that a few diverged runs do not dominate a GP fit.

Validation scores of a study are far from Gaussian: most runs cluster near the best value and a few diverge
to chance level. Standardising such targets spends most of the GP's range on the outliers. The rank warp maps
each training target to the normal quantile of its (mid-)rank, ``z = Phi^-1((rank + 1/2) / n)``, and is
extended to any value by linear interpolation between the training pairs ``(y, z)`` (linearly extrapolated
beyond them with the slope of the outermost pairs). Its inverse maps predictions back; a predicted variance
goes back by the delta method (times the squared slope of the inverse at the predicted mean).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _interpolate(x: Tensor, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
    """Piecewise-linear ``y(x)`` through increasing knots ``(xs, ys)``, linear beyond; returns ``(y, slope)``."""
    index = torch.searchsorted(xs, x.contiguous()).clamp(1, xs.numel() - 1)
    x0, x1 = xs[index - 1], xs[index]
    y0, y1 = ys[index - 1], ys[index]
    slope = (y1 - y0) / (x1 - x0)
    return y0 + slope * (x - x0), slope


class RankWarp:
    """The rank-to-normal-score warp of a set of targets (float64 throughout).

    Build it with :meth:`fit`; an unfitted warp (or one fitted on fewer than two distinct values) is the
    identity.
    """

    def __init__(self) -> None:
        self._y: Tensor | None = None  # distinct training values, increasing, [K]
        self._z: Tensor | None = None  # their normal scores, increasing, [K]

    @property
    def is_identity(self) -> bool:
        """Whether the warp leaves values unchanged."""
        return self._y is None

    def fit(self, targets: Tensor) -> RankWarp:
        """Fit on training targets ``[N]``; ties share the mean normal score of their ranks."""
        values = targets.detach().to(torch.float64).reshape(-1)
        distinct, inverse = torch.unique(values, sorted=True, return_inverse=True)
        if distinct.numel() < 2:
            self._y = self._z = None
            return self
        n = values.numel()
        order = torch.argsort(values, stable=True)
        ranks = torch.empty(n, dtype=torch.float64)
        ranks[order] = torch.arange(n, dtype=torch.float64)
        mean_rank = torch.zeros(distinct.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
        mean_rank = mean_rank / torch.bincount(inverse, minlength=distinct.numel()).to(torch.float64)
        quantile = (mean_rank + 0.5) / n
        self._y, self._z = distinct, torch.special.ndtri(quantile)
        return self

    def forward(self, values: Tensor) -> Tensor:
        """Warp values of any shape (float64 result)."""
        values = values.to(torch.float64)
        if self._y is None or self._z is None:
            return values
        flat, _ = _interpolate(values.reshape(-1), self._y, self._z)
        return flat.reshape(values.shape)

    def inverse(self, mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:
        """Map a warped-space prediction ``(mean, variance)`` (each ``[M]``) back to target units."""
        mean, variance = mean.to(torch.float64), variance.to(torch.float64)
        if self._y is None or self._z is None:
            return mean, variance
        back, slope = _interpolate(mean, self._z, self._y)
        return back, variance * slope.square()

    def state_dict(self) -> dict[str, Any]:
        """The knots (CPU tensors), or ``None`` entries for the identity."""
        return {"y": None if self._y is None else self._y.clone(), "z": None if self._z is None else self._z.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        y, z = state.get("y"), state.get("z")
        self._y = None if y is None else y.to(torch.float64)
        self._z = None if z is None else z.to(torch.float64)


__all__ = ["RankWarp"]
