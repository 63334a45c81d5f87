"""Paired-seed statistics of ``fms`` against the non-FMS methods, and their section of ``summary.md``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lightning_fms.bench.comparison import compare_kendall, compare_on_task, goal, paired_wilcoxon
from lightning_fms.bench.report import ReportMeta, write_report


def test_paired_wilcoxon_matches_scipy_and_handles_ties_and_gaps():
    x = [0.1, 0.3, 0.2, 0.5, 0.4, 0.05]
    y = [0.2, 0.5, 0.25, 0.9, 0.3, 0.3]
    expected = stats.wilcoxon(np.subtract(x, y)).pvalue
    assert paired_wilcoxon(x, y) == pytest.approx(expected)
    assert paired_wilcoxon([0.2, 0.1, 0.0], [0.2, 0.1, 0.0]) == 1.0  # scipy refuses all-zero differences
    assert paired_wilcoxon([0.2, math.nan], [0.1, 0.3]) == pytest.approx(stats.wilcoxon([0.1]).pvalue)
    assert math.isnan(paired_wilcoxon([math.nan], [0.1]))
    with pytest.raises(ValueError, match="same shape"):
        paired_wilcoxon([0.1, 0.2], [0.1])


def test_compare_on_task_takes_the_best_baseline_and_pairs_by_seed():
    finals = {
        "fms": {0: 0.1, 1: 0.2, 2: 0.0, 3: 0.1},
        "gp": {0: 0.3, 1: 0.4, 2: 0.2, 3: 0.5},
        "random": {0: 0.6, 1: 0.7, 2: 0.5, 3: 0.8},
        "fms-gmn": {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0},  # not a baseline
    }
    c = compare_on_task("t", finals, "fms", ["gp", "random", "hyperband"])
    assert c is not None and c.baseline == "gp"
    assert c.reference_mean == pytest.approx(0.1) and c.baseline_mean == pytest.approx(0.35)
    assert c.ratio == pytest.approx(0.1 / 0.35) and c.no_worse and c.pairs == 4
    assert c.p_value == pytest.approx(stats.wilcoxon([-0.2, -0.2, -0.2, -0.4]).pvalue)
    worse = compare_on_task("t", {"fms": {0: 0.5, 1: 0.5}, "gp": {0: 0.4, 2: 0.1}}, "fms", ["gp"])
    assert worse is not None and not worse.no_worse and worse.pairs == 1  # only seed 0 pairs
    assert compare_on_task("t", {"gp": {0: 0.1}}, "fms", ["gp"]) is None
    zero = compare_on_task("t", {"fms": {0: 0.0}, "gp": {0: 0.0}}, "fms", ["gp"])
    assert zero is not None and zero.ratio == 1.0 and zero.p_value == 1.0 and zero.no_worse


def test_goal_uses_the_single_best_baseline_over_tasks():
    finals = {
        "a": {"fms": {0: 0.1}, "gp": {0: 0.3}, "random": {0: 0.2}},
        "b": {"fms": {0: 0.3}, "gp": {0: 0.1}, "random": {0: 0.4}},
        "c": {"fms": {0: 0.05}, "gp": {0: 0.2}},  # random did not run here, so it cannot be the goal's baseline
    }
    result = goal(finals, "fms", ["random", "gp"])
    assert result is not None and result.baseline == "gp"
    assert result.reference_mean == pytest.approx(0.15) and result.baseline_mean == pytest.approx(0.2)
    assert not result.met  # 0.15 > 0.5 x 0.2
    assert result.no_worse == {"a": True, "b": False, "c": True}
    assert goal(finals, "fms", ["gp"], factor=0.8).met  # 0.15 <= 0.16
    assert goal(finals, "fms", ["hyperband"]) is None


def test_compare_kendall_pairs_seeds_with_finite_taus():
    k = compare_kendall({0: 0.5, 1: 0.6, 2: math.nan}, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.0}, 50)
    assert k.epochs_spent == 50 and k.pairs == 2
    assert k.first_mean == pytest.approx(0.55) and k.second_mean == pytest.approx(0.15)
    assert k.p_value == pytest.approx(stats.wilcoxon([0.4, 0.4]).pvalue)


def _rows(task: str, method: str, seed: int, regrets: list[float]) -> list[dict[str, float | int | str]]:
    return [
        {
            "task": task,
            "method": method,
            "seed": seed,
            "epochs_spent": e + 1,
            "regret": r,
            "test_regret": r,
            "wall_s": float(e + 1),
            "trials_started": 1 + e // 2,
        }
        for e, r in enumerate(regrets)
    ]


def test_summary_states_the_paired_comparison_and_the_goal_line(tmp_path):
    results, kendall = [], []
    level = {"fms": 0.05, "gp": 0.2, "hyperband": 0.3}
    for task, shift in (("a", 0.0), ("b", 0.1)):
        for method, final in level.items():
            for seed in range(3):
                results += _rows(task, method, seed, [0.9, 0.5, final + shift + 0.01 * seed])
                if method in ("fms", "gp"):
                    tau = 0.6 if method == "fms" else 0.2
                    kendall.append(
                        {"task": task, "method": method, "seed": seed, "epochs_spent": 2, "kendall_tau": tau}
                    )
    tasks = [
        {
            "name": t,
            "size": 8,
            "epochs": 3,
            "mode": "max",
            "fingerprint": "x",
            "bounds": dict.fromkeys(("best_val", "worst_val", "best_test", "worst_test"), 0.0),
        }
        for t in ("a", "b")
    ]
    meta = ReportMeta(None, budget=3, seeds=[0, 1, 2], kendall_at=[2], methods=list(level), tasks=tasks)
    summary, _ = write_report(tmp_path, results, kendall, meta)
    text = summary.read_text()
    assert "## `fms` against the non-FMS methods" in text
    p = stats.wilcoxon([(0.05 + 0.01 * s) - (0.2 + 0.01 * s) for s in range(3)]).pvalue
    assert f"| a | gp | 0.0600 | 0.2100 | {0.06 / 0.21:.2f} | {p:.3g} (3 seeds) | yes | 0.600 vs 0.200 (" in text
    fms_mean, gp_mean = (0.06 + 0.16) / 2, (0.21 + 0.31) / 2
    line = f"over tasks, `gp`: {fms_mean:.4f} vs 0.5 x {gp_mean:.4f} = {0.5 * gp_mean:.4f}: **met**;"
    assert line + " no worse than `gp` on 2 of 2 tasks." in text
    assert "| fms | the library default" in text
