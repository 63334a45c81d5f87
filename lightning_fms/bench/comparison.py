"""Paired-seed comparisons of one method (the library default ``fms``) with the baselines, and the goal line.

Every method with a given seed starts from the same pool order (common random numbers), so the comparisons pair
runs by seed:

* :func:`paired_wilcoxon`: the two-sided Wilcoxon signed-rank p-value of paired values (``1.0`` when every
  difference is zero, where :func:`scipy.stats.wilcoxon` refuses);
* :func:`compare_on_task`: the reference against the best baseline of one task (lowest mean final regret): both
  means, their ratio, the p-value, whether the reference is no worse (mean regret not above the baseline's);
* :func:`goal`: the reference's mean regret over tasks against ``factor`` times that of the single best baseline
  over tasks (the one with the lowest mean over tasks among those run on every task);
* :func:`compare_kendall`: the reference's and another method's Kendall tau per check point, paired by seed.

Inputs are plain mappings ``task -> method -> seed -> value`` (final regret) or ``seed -> tau``, so the
statistics do not depend on how the report stores its curves.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: ``method -> seed -> value``.
BySeed = Mapping[str, Mapping[int, float]]


def paired_wilcoxon(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``x - y`` (pairs with a non-finite side are left out).

    Args:
        x: ``[S]`` values of one method, one per seed.
        y: ``[S]`` values of the other method for the same seeds.

    Returns:
        The p-value; ``1.0`` when every difference is zero; ``nan`` without a finite pair.
    """
    from scipy import stats

    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same shape, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    if not keep.any():
        return math.nan
    differences = a[keep] - b[keep]
    if np.all(differences == 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small samples: scipy warns about its normal approximation and ties
        return float(stats.wilcoxon(differences).pvalue)


def _paired(first: Mapping[int, float], second: Mapping[int, float]) -> tuple[list[float], list[float]]:
    seeds = sorted(set(first) & set(second))
    return [float(first[s]) for s in seeds], [float(second[s]) for s in seeds]


def _mean(values: Mapping[int, float]) -> float:
    finite = [float(v) for v in values.values() if math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return 1.0 if numerator == denominator else math.inf


@dataclass(frozen=True)
class TaskComparison:
    """The reference against the best baseline on one task.

    Attributes:
        task: The task.
        reference: The reference method.
        baseline: The baseline with the lowest mean final regret on this task.
        reference_mean: The reference's mean final regret over its seeds.
        baseline_mean: The baseline's mean final regret over its seeds.
        ratio: ``reference_mean / baseline_mean`` (``1`` when both are 0, ``inf`` when only the baseline's is).
        p_value: Wilcoxon signed-rank p-value over the seeds both ran.
        pairs: How many seeds both ran.
        no_worse: ``reference_mean <= baseline_mean``.
    """

    task: str
    reference: str
    baseline: str
    reference_mean: float
    baseline_mean: float
    ratio: float
    p_value: float
    pairs: int
    no_worse: bool


def compare_on_task(task: str, finals: BySeed, reference: str, baselines: Sequence[str]) -> TaskComparison | None:
    """Compare ``reference`` with the best of ``baselines`` (by mean final regret) on one task.

    Args:
        task: The task's name.
        finals: ``method -> seed -> final regret`` on this task.
        reference: The method compared.
        baselines: The candidate baselines (those not in ``finals`` are skipped; ties go to the first).

    Returns:
        The comparison, or ``None`` when the reference or every baseline is missing.
    """
    present = [b for b in baselines if finals.get(b) and math.isfinite(_mean(finals[b]))]
    if not finals.get(reference) or not present:
        return None
    best = min(present, key=lambda b: _mean(finals[b]))
    ours, theirs = _mean(finals[reference]), _mean(finals[best])
    x, y = _paired(finals[reference], finals[best])
    return TaskComparison(
        task=task,
        reference=reference,
        baseline=best,
        reference_mean=ours,
        baseline_mean=theirs,
        ratio=_ratio(ours, theirs),
        p_value=paired_wilcoxon(x, y),
        pairs=len(x),
        no_worse=ours <= theirs,
    )


@dataclass(frozen=True)
class Goal:
    """The reference's mean regret over tasks against ``factor`` times the best baseline's.

    Attributes:
        reference: The reference method.
        baseline: The baseline with the lowest mean over tasks (among those run on every task).
        reference_mean: Mean over tasks of the reference's per-task mean final regret.
        baseline_mean: The same for the baseline.
        factor: The goal's factor (``0.5``: half the baseline's regret).
        met: ``reference_mean <= factor * baseline_mean``.
        no_worse: ``task -> reference's per-task mean <= the baseline's``.
    """

    reference: str
    baseline: str
    reference_mean: float
    baseline_mean: float
    factor: float
    met: bool
    no_worse: dict[str, bool]


def goal(finals: Mapping[str, BySeed], reference: str, baselines: Sequence[str], factor: float = 0.5) -> Goal | None:
    """The goal line: whether the reference's mean regret over tasks is at most ``factor`` x the best baseline's.

    Args:
        finals: ``task -> method -> seed -> final regret``.
        reference: The method judged.
        baselines: The candidate baselines; only those run on every task where the reference ran count.
        factor: The goal's factor.

    Returns:
        The goal, or ``None`` when the reference ran nowhere or no baseline ran on all its tasks.
    """
    tasks = [t for t, methods in finals.items() if methods.get(reference)]
    complete = [b for b in baselines if tasks and all(finals[t].get(b) for t in tasks)]
    if not complete:
        return None

    def over_tasks(method: str) -> float:
        return float(np.mean([_mean(finals[t][method]) for t in tasks]))

    best = min(complete, key=over_tasks)
    ours, theirs = over_tasks(reference), over_tasks(best)
    return Goal(
        reference=reference,
        baseline=best,
        reference_mean=ours,
        baseline_mean=theirs,
        factor=factor,
        met=ours <= factor * theirs,
        no_worse={t: _mean(finals[t][reference]) <= _mean(finals[t][best]) for t in tasks},
    )


@dataclass(frozen=True)
class KendallComparison:
    """Two methods' Kendall tau at one check point of one task, paired by seed.

    Attributes:
        epochs_spent: The check point.
        first_mean: The first method's mean tau over its seeds (``nan`` entries left out).
        second_mean: The second method's.
        p_value: Wilcoxon signed-rank p-value over the seeds where both taus are finite.
        pairs: How many such seeds.
    """

    epochs_spent: int
    first_mean: float
    second_mean: float
    p_value: float
    pairs: int


def compare_kendall(first: Mapping[int, float], second: Mapping[int, float], epochs_spent: int) -> KendallComparison:
    """Compare two methods' ``seed -> Kendall tau`` at one check point."""
    x, y = _paired(first, second)
    pairs = sum(math.isfinite(a) and math.isfinite(b) for a, b in zip(x, y, strict=True))
    return KendallComparison(int(epochs_spent), _mean(first), _mean(second), paired_wilcoxon(x, y), pairs)
