"""Benchmark metrics: normalised regret, rank correlation of forecasts, curves on common grids, seed statistics.

Everything is in *score units* (larger is better: the metric itself for ``mode="max"``, its negation for
``mode="min"``), so one formula serves both directions.

* Normalised regret of a validation incumbent: ``(y_star - y_inc) / (y_star - y_worst)`` with ``y_star`` and
  ``y_worst`` the best and worst validation scores of the whole pool (every configuration, every epoch). It is
  ``0`` exactly when the pool's best validation value has been seen and ``1`` before anything was seen.
* Test regret: the same with the pool's best and worst *test* scores, for the test value of the configuration
  and epoch selected on validation (never the best test value seen, which would select on the test set).
* Rank correlation of a forecast: Kendall's tau and Spearman's rho between the predicted and the true final
  scores of the *same* configurations, position by position (upstream correlated the two sequences of
  configuration ids sorted by each score, which is not a rank correlation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightning_fms.errors import FMSError


def to_scores(values: np.ndarray, mode: str) -> np.ndarray:
    """Larger-is-better form of metric values; non-finite values become ``nan``.

    Args:
        values: Metric values, any shape.
        mode: ``"max"`` or ``"min"``.

    Returns:
        Float64 array of the same shape.
    """
    if mode not in ("max", "min"):
        raise FMSError(f"mode must be 'max' or 'min', got {mode!r}")
    scores = np.asarray(values, dtype=np.float64)
    scores = np.where(np.isfinite(scores), scores, np.nan)
    return scores if mode == "max" else -scores


@dataclass(frozen=True)
class RegretBounds:
    """Best and worst scores of a pool, the ends of the normalised-regret scale.

    Attributes:
        best_val: Best validation score over every configuration and epoch.
        worst_val: Worst validation score over every configuration and epoch.
        best_test: Best test score over every configuration and epoch.
        worst_test: Worst test score over every configuration and epoch.
    """

    best_val: float
    worst_val: float
    best_test: float
    worst_test: float

    @classmethod
    def of(cls, val: np.ndarray, test: np.ndarray, mode: str) -> RegretBounds:
        """Bounds of a pool's ``[N, E]`` validation and test tables (non-finite entries ignored).

        Raises:
            FMSError: a table holds no finite value.
        """
        val_s, test_s = to_scores(val, mode), to_scores(test, mode)
        if not np.isfinite(val_s).any() or not np.isfinite(test_s).any():
            raise FMSError("the pool has no finite validation or test value")
        return cls(
            best_val=float(np.nanmax(val_s)),
            worst_val=float(np.nanmin(val_s)),
            best_test=float(np.nanmax(test_s)),
            worst_test=float(np.nanmin(test_s)),
        )

    def to_dict(self) -> dict[str, float]:
        """Plain-data form."""
        return {k: float(getattr(self, k)) for k in ("best_val", "worst_val", "best_test", "worst_test")}


def normalised_regret(incumbent: np.ndarray | float, best: float, worst: float) -> np.ndarray:
    """``(best - incumbent) / (best - worst)``, clipped to ``[0, 1]``.

    Args:
        incumbent: Incumbent score(s) (``nan``: nothing seen yet, regret 1), any shape.
        best: Best score of the pool.
        worst: Worst score of the pool.

    Returns:
        Float64 array shaped like ``incumbent``; all zeros when ``best == worst``.
    """
    inc = np.asarray(incumbent, dtype=np.float64)
    if best <= worst:
        return np.where(np.isfinite(inc), 0.0, 1.0)
    regret = (best - inc) / (best - worst)
    return np.clip(np.where(np.isfinite(regret), regret, 1.0), 0.0, 1.0)


def rank_correlation(predicted: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Kendall's tau and Spearman's rho between predicted and true scores of the same configurations.

    Entry ``j`` of both arrays belongs to the same configuration; configurations whose true or predicted
    score is not finite are left out (``n_configs`` counts the ones kept).

    Args:
        predicted: ``[N]`` forecast scores.
        true: ``[N]`` true scores.

    Returns:
        ``{"kendall_tau", "kendall_p", "spearman", "n_configs"}``; ``nan`` correlations below 2 configurations
        or when one side is constant.
    """
    from scipy import stats

    predicted = np.asarray(predicted, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if predicted.shape != true.shape or predicted.ndim != 1:
        raise FMSError(f"predicted {predicted.shape} and true {true.shape} scores must be two [N] arrays")
    keep = np.isfinite(predicted) & np.isfinite(true)
    n = int(keep.sum())
    nan = {"kendall_tau": math.nan, "kendall_p": math.nan, "spearman": math.nan, "n_configs": n}
    if n < 2 or np.ptp(predicted[keep]) == 0 or np.ptp(true[keep]) == 0:
        return nan
    tau = stats.kendalltau(predicted[keep], true[keep])
    rho = stats.spearmanr(predicted[keep], true[keep])
    return {
        "kendall_tau": float(tau.statistic),
        "kendall_p": float(tau.pvalue),
        "spearman": float(rho.statistic),
        "n_configs": n,
    }


def step_resample(x: np.ndarray, y: np.ndarray, grid: np.ndarray, before: float = 1.0) -> np.ndarray:
    """Value of the step function through ``(x, y)`` (right-continuous, last value held) on ``grid``.

    Args:
        x: ``[T]`` non-decreasing positions (epochs spent, wall seconds).
        y: ``[T]`` values from each position on.
        grid: ``[G]`` query positions.
        before: Value before ``x[0]``.

    Returns:
        ``[G]`` values.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    idx = np.searchsorted(x, grid, side="right") - 1
    out = np.full(grid.shape, before, dtype=np.float64)
    if x.size:
        out[idx >= 0] = y[idx[idx >= 0]]
    return out


def epochs_grid(budget: int) -> np.ndarray:
    """``[budget]`` grid ``1 .. budget`` of epochs spent."""
    return np.arange(1, int(budget) + 1, dtype=np.float64)


def wall_grid(starts: Sequence[float], ends: Sequence[float], points: int = 200) -> np.ndarray:
    """Log-spaced ``[points]`` grid from the earliest first step to the latest last step of several runs.

    Args:
        starts: Wall seconds of each run's first epoch.
        ends: Wall seconds of each run's last epoch.
        points: Grid size.
    """
    lo = max(min(starts), 1e-6)
    hi = max(max(ends), lo * (1 + 1e-9))
    return np.geomspace(lo, hi, points)


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and Student-t confidence interval over seeds (axis 0).

    Args:
        values: ``[S, G]`` one row per seed (``nan`` entries are left out per column).
        level: Confidence level.

    Returns:
        ``(mean, low, high)``, each ``[G]``; ``low``/``high`` are ``nan`` where fewer than 2 seeds count.
    """
    from scipy import stats

    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    count = np.isfinite(values).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.where(np.isfinite(values), values, 0.0).sum(axis=0)
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        sq = np.where(np.isfinite(values), (values - mean) ** 2, 0.0).sum(axis=0)
        sem = np.sqrt(sq / np.maximum(count - 1, 1)) / np.sqrt(np.maximum(count, 1))
        t = stats.t.ppf(0.5 + level / 2, np.maximum(count - 1, 1))
        half = np.where(count >= 2, t * sem, np.nan)
    return mean, mean - half, mean + half
