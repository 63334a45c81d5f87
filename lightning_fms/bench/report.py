"""The benchmark report: regret and Kendall-tau figures (PNG, matplotlib Agg) and ``summary.md``.

Every method that ran is shown, winners and losers alike, with the mean over seeds and a 95% Student-t
confidence interval (none for a single seed). Figures per task:

* ``regret_epochs_{task}.png``: normalised regret of the validation-selected incumbent vs epochs spent
  (log y; regret 0 is drawn at :data:`REGRET_FLOOR`);
* ``regret_wall_{task}.png``: the same vs wall seconds (tabulated training + measured decision seconds,
  log x; after its last epoch a run keeps its final regret);

and ``kendall.png``: Kendall's tau of each surrogate method's forecast of every configuration's final
validation score, per task and check point.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_fms.atomic import atomic_write_bytes, atomic_write_text
from lightning_fms.bench.comparison import compare_kendall, compare_on_task, goal
from lightning_fms.bench.methods import BASELINES, METHODS, REFERENCE_METHOD
from lightning_fms.bench.metrics import epochs_grid, mean_ci, step_resample, wall_grid
from lightning_fms.bench.transfer_report import transfer_section
from lightning_fms.extras import import_optional

#: Regret 0 is drawn at this value on log axes.
REGRET_FLOOR = 1e-4
#: Epochs-spent columns of the summary tables (those above the budget are left out; the budget is added).
TABLE_EPOCHS = (25, 50, 100)


@dataclass
class ReportMeta:
    """What the report states besides the results.

    Attributes:
        command: The command line (``None``: called from Python).
        budget: Epochs per run.
        seeds: The seeds.
        kendall_at: Forecast check points (epochs spent).
        methods: Method names, in the order they were asked for.
        tasks: One dict per task: ``name``, ``size``, ``epochs``, ``mode``, ``bounds``, ``fingerprint``.
        options: Surrogate options of the forecasting methods.
        exhausted: Runs that ran out of trainable epochs before the budget.
        run_seconds: Seconds of all runs together (cached ones as first measured).
        notes: ``task -> method -> distinct warnings`` the runs raised.
    """

    command: str | None
    budget: int
    seeds: list[int]
    kendall_at: list[int]
    methods: list[str]
    tasks: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    exhausted: list[str] = field(default_factory=list)
    run_seconds: float = 0.0
    notes: dict[str, dict[str, list[str]]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- aggregation
def _runs(results: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[int, dict[str, np.ndarray]]]:
    """``(task, method) -> seed -> column -> [T]`` arrays, sorted by epochs spent."""
    grouped: dict[tuple[str, str], dict[int, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in results:
        grouped[(str(row["task"]), str(row["method"]))][int(row["seed"])].append(row)
    out: dict[tuple[str, str], dict[int, dict[str, np.ndarray]]] = {}
    for key, seeds in grouped.items():
        out[key] = {}
        for seed, rows in seeds.items():
            rows = sorted(rows, key=lambda r: int(r["epochs_spent"]))
            out[key][seed] = {
                c: np.array([float(r[c]) for r in rows]) for c in ("epochs_spent", "regret", "test_regret", "wall_s")
            }
            out[key][seed]["trials_started"] = np.array([float(r.get("trials_started", math.nan)) for r in rows])
    return out


def _finals(seeds: Mapping[int, Mapping[str, np.ndarray]], budget: int) -> dict[int, float]:
    """``seed -> regret @budget`` (a run that ended early keeps its last regret)."""
    return dict(zip(seeds, _on_epochs(seeds, "regret", budget)[:, -1].tolist(), strict=True))


def _trials_per_100(seeds: Mapping[int, Mapping[str, np.ndarray]]) -> np.ndarray:
    """``[S]`` trials started per 100 epochs spent, over each whole run."""
    return np.array(
        [
            100.0 * s["trials_started"][-1] / s["epochs_spent"][-1] if s["epochs_spent"].size else math.nan
            for s in seeds.values()
        ]
    )


def _on_epochs(seeds: Mapping[int, Mapping[str, np.ndarray]], column: str, budget: int) -> np.ndarray:
    """``[S, budget]`` values of ``column`` at epochs ``1 .. budget`` (held after a run's end)."""
    grid = epochs_grid(budget)
    return np.stack([step_resample(s["epochs_spent"], s[column], grid) for s in seeds.values()])


def _fmt(mean: float, low: float, high: float, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "–"
    text = f"{mean:.{digits}f}"
    if math.isfinite(low) and math.isfinite(high):
        text += f" ± {(high - low) / 2:.{digits}f}"
    return text


def _stat(values: np.ndarray) -> tuple[float, float, float]:
    mean, low, high = mean_ci(np.asarray(values, dtype=np.float64).reshape(-1, 1))
    return float(mean[0]), float(low[0]), float(high[0])


def _ranks(means: Mapping[str, tuple[float, float]]) -> dict[str, int]:
    """Competition ranks (1 = best) by mean final regret, ties broken by mean regret over the run."""
    order = sorted(means, key=lambda m: (means[m][0], means[m][1]))
    ranks: dict[str, int] = {}
    for position, method in enumerate(order, start=1):
        previous = order[position - 2] if position > 1 else None
        same = previous is not None and means[previous] == means[method]
        ranks[method] = ranks[previous] if same and previous is not None else position
    return ranks


# ----------------------------------------------------------------------------------------------- figures
def _family(method: str) -> str:
    return method.removesuffix("-nocnn").removesuffix("-hidden")


#: One colour slot per method family (a method, its ``-nocnn`` ablation and its ``-hidden`` regime), in report order.
_FAMILIES = tuple(dict.fromkeys(_family(name) for name in METHODS))


def _style(method: str, index: int) -> dict[str, Any]:
    """One tab10 colour per family; dashed: no CNN; dash-dot: hub hidden; dotted: peers."""
    import matplotlib

    family = _family(method)
    slot = _FAMILIES.index(family) if family in _FAMILIES else index
    colour = matplotlib.colormaps["tab10"](slot % 10)
    peer = family in ("random", "hyperband", "asha", "optuna", "gp")
    if method.endswith("-nocnn"):
        linestyle = "--"
    elif method.endswith("-hidden"):
        linestyle = "-."
    else:
        linestyle = ":" if peer else "-"
    return {"color": colour, "linestyle": linestyle, "linewidth": 1.6}


def _save(fig: Any, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _regret_figure(
    task: str,
    methods: Sequence[str],
    data: Mapping[tuple[str, str], Mapping[int, Mapping[str, np.ndarray]]],
    budget: int,
    out: Path,
    wall: bool,
) -> Path:
    """All methods' mean regret in the first panel, then one panel per method with its 95% band."""
    import matplotlib.pyplot as plt

    present = [m for m in methods if (task, m) in data]
    if wall:
        starts = [s["wall_s"][0] for m in present for s in data[(task, m)].values() if s["wall_s"].size]
        ends = [s["wall_s"][-1] for m in present for s in data[(task, m)].values() if s["wall_s"].size]
        grid = wall_grid(starts, ends) if starts else np.array([1.0])
    else:
        grid = epochs_grid(budget)
    curves = {}
    for method in present:
        seeds = data[(task, method)]
        if wall:
            values = np.stack([step_resample(s["wall_s"], s["regret"], grid) for s in seeds.values()])
        else:
            values = _on_epochs(seeds, "regret", budget)
        curves[method] = [np.maximum(v, REGRET_FLOOR) for v in mean_ci(values)]
    columns = 4
    rows = 1 + math.ceil(len(present) / columns)
    fig = plt.figure(figsize=(4 * columns, 3.2 + 2.4 * (rows - 1)))
    grid_spec = fig.add_gridspec(rows, columns, height_ratios=[1.6] + [1.0] * (rows - 1))
    overview = fig.add_subplot(grid_spec[0, :])
    for index, method in enumerate(present):
        overview.plot(grid, curves[method][0], label=method, **_style(method, index))
    overview.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    seeds_n = max((len(data[(task, m)]) for m in present), default=0)
    overview.set_title(
        f"{task}: mean normalised regret over {seeds_n} seed(s)"
        + ("; panels: each method with its 95% CI" if seeds_n > 1 else "")
    )
    axes = [overview]
    for index, method in enumerate(present):
        ax = fig.add_subplot(grid_spec[1 + index // columns, index % columns], sharex=overview, sharey=overview)
        for other in present:
            if other != method:
                ax.plot(grid, curves[other][0], color="0.82", linewidth=0.8)
        style = _style(method, index)
        mean, low, high = curves[method]
        if seeds_n > 1:
            ax.fill_between(grid, low, high, color=style["color"], alpha=0.25, linewidth=0)
        ax.plot(grid, mean, **{**style, "linestyle": "-"})
        ax.set_title(method, fontsize=9)
        axes.append(ax)
    for ax in axes:
        ax.set_yscale("log")
        if wall:
            ax.set_xscale("log")
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=7)
    overview.set_xlabel("wall seconds (tabulated training + measured decisions)" if wall else "epochs spent")
    overview.set_ylabel(f"regret (0 drawn at {REGRET_FLOOR:g})")
    fig.tight_layout()
    path = _save(fig, out / f"regret_{'wall' if wall else 'epochs'}_{safe_name(task)}.png")
    plt.close(fig)
    return path


def _kendall_figure(
    tasks: Sequence[str], methods: Sequence[str], kendall: Sequence[Mapping[str, Any]], checks: Sequence[int], out: Path
) -> Path:
    import matplotlib.pyplot as plt

    forecasting = [m for m in methods if m in METHODS and METHODS[m].forecasts]
    fig, axes = plt.subplots(
        len(tasks), 1, figsize=(max(6, 0.9 * len(forecasting) + 2), 3.2 * len(tasks)), squeeze=False
    )
    width = 0.8 / max(1, len(checks))
    for ax, task in zip(axes[:, 0], tasks, strict=True):
        for j, check in enumerate(checks):
            means, lows, highs = [], [], []
            for method in forecasting:
                taus = [
                    float(r["kendall_tau"])
                    for r in kendall
                    if r["task"] == task and r["method"] == method and int(r["epochs_spent"]) == check
                ]
                mean, low, high = _stat(np.array(taus)) if taus else (math.nan, math.nan, math.nan)
                means.append(mean)
                lows.append(max(-1.0, low) if math.isfinite(low) else mean)
                highs.append(min(1.0, high) if math.isfinite(high) else mean)
            x = np.arange(len(forecasting)) + (j - (len(checks) - 1) / 2) * width
            centre = np.nan_to_num(np.array(means))
            errors = np.nan_to_num(np.stack([centre - np.array(lows), np.array(highs) - centre]))
            ax.bar(x, centre, width, yerr=errors, capsize=2, label=f"@{check} epochs")
        ax.set_xticks(np.arange(len(forecasting)), forecasting, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Kendall tau")
        ax.set_ylim(-1.05, 1.05)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(f"{task}: forecast of every configuration's final validation score (mean, 95% CI)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = _save(fig, out / "kendall.png")
    plt.close(fig)
    return path


def safe_name(name: str) -> str:
    """``name`` with every character outside ``[A-Za-z0-9._-]`` replaced by ``_`` (for file names)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name)) or "_"


# ----------------------------------------------------------------------------------------------- summary
def _machine() -> str:
    import torch

    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"
    )


def _task_table(
    task: Mapping[str, Any],
    methods: Sequence[str],
    data: Mapping[tuple[str, str], Mapping[int, Mapping[str, np.ndarray]]],
    kendall: Sequence[Mapping[str, Any]],
    meta: ReportMeta,
) -> list[str]:
    name = task["name"]
    budget = meta.budget
    points = sorted({e for e in TABLE_EPOCHS if e <= budget} | {budget})
    header = (
        ["rank", "method"]
        + [f"regret @{e}" for e in points]
        + [f"test regret @{budget}", f"wall s @{budget}", "trials /100 epochs"]
        + [f"Kendall tau @{k}" for k in meta.kendall_at]
    )
    rows: dict[str, list[str]] = {}
    finals: dict[str, tuple[float, float]] = {}
    for method in methods:
        seeds = data.get((name, method))
        if not seeds:
            continue
        regret = _on_epochs(seeds, "regret", budget)
        test_regret = _on_epochs(seeds, "test_regret", budget)
        wall = np.array([s["wall_s"][-1] if s["wall_s"].size else math.nan for s in seeds.values()])
        cells = [_fmt(*_stat(regret[:, e - 1])) for e in points]
        cells.append(_fmt(*_stat(test_regret[:, -1])))
        cells.append(_fmt(*_stat(wall), digits=1))
        cells.append(_fmt(*_stat(_trials_per_100(seeds)), digits=1))
        for check in meta.kendall_at:
            taus = [
                float(r["kendall_tau"])
                for r in kendall
                if r["task"] == name and r["method"] == method and int(r["epochs_spent"]) == check
            ]
            cells.append(_fmt(*_stat(np.array(taus)), digits=3) if taus else "–")
        rows[method] = cells
        finals[method] = (float(np.mean(regret[:, -1])), float(np.mean(regret)))
    ranks = _ranks(finals)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for method in sorted(rows, key=lambda m: (ranks[m], methods.index(m))):
        lines.append("| " + " | ".join([str(ranks[method]), method, *rows[method]]) + " |")
    return lines


def _p(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "–"


def _kendall_by_seed(kendall: Sequence[Mapping[str, Any]], task: str, method: str, check: int) -> dict[int, float]:
    return {
        int(r["seed"]): float(r["kendall_tau"])
        for r in kendall
        if r["task"] == task and r["method"] == method and int(r["epochs_spent"]) == check
    }


def _comparison_section(
    data: Mapping[tuple[str, str], Mapping[int, Mapping[str, np.ndarray]]],
    kendall: Sequence[Mapping[str, Any]],
    meta: ReportMeta,
) -> list[str]:
    """The library default against the best non-FMS method per task (paired by seed), and the goal line."""
    ref, budget = REFERENCE_METHOD, meta.budget
    tasks = [t["name"] for t in meta.tasks]
    finals = {t: {m: _finals(data[(t, m)], budget) for m in meta.methods if (t, m) in data} for t in tasks}
    comparisons = [c for t in tasks if (c := compare_on_task(t, finals[t], ref, BASELINES)) is not None]
    if not comparisons:
        return []
    with_gp = "gp" in meta.methods and METHODS[ref].forecasts
    header = ["task", "best non-FMS", f"{ref} regret @{budget}", "its regret", "ratio", "Wilcoxon p", "no worse"]
    header += [f"Kendall tau @{k}: {ref} vs gp (p)" for k in meta.kendall_at] if with_gp else []
    lines = [
        "",
        f"## `{ref}` against the non-FMS methods",
        "",
        f"Non-FMS: {', '.join(BASELINES)}. Per task, `{ref}` against the non-FMS method with the lowest mean "
        f"regret @{budget} on that task, paired by seed: the means, their ratio, the two-sided Wilcoxon "
        "signed-rank p-value (1 when every difference is zero) and whether "
        f"`{ref}`'s mean is no worse (not above); then Kendall tau of `{ref}` and `gp`, paired by seed.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for c in comparisons:
        cells = [c.task, c.baseline, f"{c.reference_mean:.4f}", f"{c.baseline_mean:.4f}", f"{c.ratio:.2f}"]
        cells += [f"{_p(c.p_value)} ({c.pairs} seeds)", "yes" if c.no_worse else "no"]
        for check in meta.kendall_at if with_gp else []:
            k = compare_kendall(
                _kendall_by_seed(kendall, c.task, ref, check), _kendall_by_seed(kendall, c.task, "gp", check), check
            )
            cells.append(f"{_fmt(k.first_mean, math.nan, math.nan, 3)} vs {_fmt(k.second_mean, math.nan, math.nan, 3)}")
            cells[-1] += f" ({_p(k.p_value)})"
        lines.append("| " + " | ".join(cells) + " |")
    target = goal(finals, ref, BASELINES)
    if target is not None:
        worse = [t for t, ok in target.no_worse.items() if not ok]
        lines += [
            "",
            f"Goal: `{ref}`'s mean regret @{budget} over tasks at most {target.factor:g} x that of the best "
            f"non-FMS method over tasks, `{target.baseline}`: {target.reference_mean:.4f} vs {target.factor:g} x "
            f"{target.baseline_mean:.4f} = {target.factor * target.baseline_mean:.4f}: "
            f"**{'met' if target.met else 'not met'}**; no worse than `{target.baseline}` on "
            f"{len(target.no_worse) - len(worse)} of {len(target.no_worse)} tasks"
            + (f" (worse on {', '.join(worse)})." if worse else "."),
        ]
    return lines


def _methods_section(methods: Sequence[str]) -> list[str]:
    lines = ["", "## Methods", "", "| method | what |", "|---|---|"]
    return lines + [f"| {m} | {METHODS[m].describe()} |" for m in methods if m in METHODS]


def _notes(notes: Mapping[str, Sequence[str]]) -> list[str]:
    lines = [f"- {method}: {note}" for method, texts in notes.items() for note in texts]
    return ["Warnings raised by the runs:", "", *lines, ""] if lines else []


def write_report(
    out_dir: str | os.PathLike[str],
    results: Sequence[Mapping[str, Any]],
    kendall: Sequence[Mapping[str, Any]],
    meta: ReportMeta,
) -> tuple[Path, list[Path]]:
    """Write the figures and ``summary.md`` into ``out_dir``.

    Args:
        out_dir: Output directory.
        results: ``results.csv`` rows (dicts with at least ``task, method, seed, epochs_spent, regret,
            test_regret, wall_s``).
        kendall: ``kendall.csv`` rows.
        meta: What else the report states.

    Returns:
        ``(summary path, figure paths)``.
    """
    matplotlib = import_optional("matplotlib", "plots", "the benchmark's figures")
    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _runs(results)
    tasks = [t["name"] for t in meta.tasks]
    figures: list[Path] = []
    for task in tasks:
        figures.append(_regret_figure(task, meta.methods, data, meta.budget, out, wall=False))
        figures.append(_regret_figure(task, meta.methods, data, meta.budget, out, wall=True))
    has_forecasts = any(METHODS[m].forecasts for m in meta.methods if m in METHODS) and meta.kendall_at
    if has_forecasts:
        figures.append(_kendall_figure(tasks, meta.methods, kendall, meta.kendall_at, out))

    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    seeds = meta.seeds
    seeds_text = (
        f"{len(seeds)} ({seeds[0]}..{seeds[-1]})"
        if seeds == list(range(seeds[0], seeds[0] + len(seeds)))
        else str(seeds)
    )
    lines = [
        "# lightning-fms bench",
        "",
        f"- command: `{meta.command}`" if meta.command else "- command: (Python API: `lightning_fms.bench.run_bench`)",
        f"- date: {now}",
        f"- machine: {_machine()}",
        f"- budget: {meta.budget} epochs per run; seeds: {seeds_text}; "
        f"Kendall tau at: {', '.join(map(str, meta.kendall_at)) or '-'} epochs spent",
        f"- methods: {', '.join(meta.methods)}",
        f"- surrogate options: `{meta.options}`",
        f"- compute of all runs: {meta.run_seconds:.0f} s",
        "",
        "Regret is normalised per task: `(y* - y_inc) / (y* - y_worst)` with `y*`, `y_worst` the best and worst "
        "validation value of the whole pool (every configuration, every epoch) and `y_inc` the best validation "
        "value the method has seen. Test regret is the same on the test values (pool's best and worst) of that "
        "validation-selected incumbent. Wall seconds = the pool's tabulated training seconds of the epochs spent "
        "+ the method's decision seconds measured on this machine. Kendall tau correlates each surrogate's "
        "forecast of every pool configuration's final validation value with the true one (same configurations "
        "on both sides). Trials /100 epochs: distinct configurations begun per 100 epochs spent (the freeze-thaw "
        "policy's breadth). Cells: mean ± half-width of the 95% Student-t interval over seeds. Rank: by mean regret "
        f"@{meta.budget}, ties broken by the mean regret over the whole run; equal means share a rank.",
    ]
    lines += _methods_section(meta.methods)
    lines += _comparison_section(data, kendall, meta)
    lines += transfer_section(data, kendall, meta.methods, [t["name"] for t in meta.tasks], meta.budget)
    if meta.exhausted:
        lines += ["", f"Runs that ran out of trainable epochs before the budget: {', '.join(meta.exhausted)}."]
    for task in meta.tasks:
        bounds = task["bounds"]
        lines += [
            "",
            f"## {task['name']}",
            "",
            f"Pool: {task['size']} configurations x {task['epochs']} epochs, mode {task['mode']}, "
            f"validation scores in [{bounds['worst_val']:.4g}, {bounds['best_val']:.4g}], "
            f"test scores in [{bounds['worst_test']:.4g}, {bounds['best_test']:.4g}] "
            f"(score = value{'' if task['mode'] == 'max' else ' negated'}); fingerprint {task['fingerprint']}.",
            "",
            *_task_table(task, meta.methods, data, kendall, meta),
            "",
            *_notes(meta.notes.get(task["name"], {})),
            f"![regret vs epochs](regret_epochs_{safe_name(task['name'])}.png)",
            f"![regret vs wall seconds](regret_wall_{safe_name(task['name'])}.png)",
        ]
    if has_forecasts:
        lines += ["", "## Kendall tau", "", "![Kendall tau](kendall.png)"]
    summary = out / "summary.md"
    atomic_write_text(summary, "\n".join(lines) + "\n")
    return summary, figures
