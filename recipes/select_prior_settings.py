"""Compare pretraining settings of the leave-one-task-out prior: how the defaults of `pretrain` were chosen.

Each variant is a JSON object of :class:`~lightning_fms.transfer.pretrain.PretrainOptions` fields. For each, the
benchmark's ``fms-prior`` method runs on every task with a prior pretrained on the other tasks only, next to
``fms`` without a prior (run once, in the first variant's folder); the table gives mean regret at 25, 50 and 100
epochs and Kendall's tau at 100, per variant and task::

    python recipes/select_prior_settings.py --out runs/select-prior --seeds 0 1 2 3 4 \\
        --variant 'default={}' --variant 'no-trunk={"trunk_steps": 0}' --variant 'fit0={"fit_steps": 0}'

The pools must be built (``python -m lightning_fms.bench.pool recipes/bench/TASK.yaml``).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from lightning_fms.bench.runner import PoolSource, run_bench
from lightning_fms.cli import DEFAULT_BENCH_TASKS


def _table(out: Path, method: str, checks: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """``task -> {"@25": mean regret, ..., "tau": mean tau @100}`` of one method in one output folder."""
    regret: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in csv.DictReader((out / "results.csv").open()):
        if row["method"] == method and int(row["epochs_spent"]) in checks:
            regret[(row["task"], int(row["epochs_spent"]))].append(float(row["regret"]))
    taus: dict[str, list[float]] = defaultdict(list)
    for row in csv.DictReader((out / "kendall.csv").open()):
        if row["method"] == method and int(row["epochs_spent"]) == max(checks):
            taus[row["task"]].append(float(row["kendall_tau"]))
    tasks = sorted({task for task, _ in regret})
    return {
        t: {**{f"@{c}": float(np.mean(regret[(t, c)])) for c in checks}, "tau": float(np.nanmean(taus[t]))}
        for t in tasks
    }


def main() -> None:
    """Run the variants and print one line per variant and task."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (one subfolder per variant)")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_BENCH_TASKS), help="task files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--variant", action="append", required=True, help='NAME=JSON, e.g. no-trunk={"trunk_steps": 0}')
    args = parser.parse_args()
    checks = (25, 50, 100)
    pools = [PoolSource(t, build=False) for t in args.tasks]
    print("| variant | task | regret @25 | regret @50 | regret @100 | Kendall tau @100 |")
    print("|---|---|---|---|---|---|")
    for index, text in enumerate(args.variant):
        name, spec = text.split("=", 1)
        out = Path(args.out) / name
        methods = ["fms", "fms-prior"] if index == 0 else ["fms-prior"]
        run_bench(pools, methods, args.seeds, 100, out, args.jobs, (100,), None, prior_options=json.loads(spec))
        rows = {"fms": _table(out, "fms", checks)} if index == 0 else {}
        rows[name] = _table(out, "fms-prior", checks)
        for label, table in rows.items():
            for task, cells in table.items():
                print(
                    f"| {label} | {task} | {cells['@25']:.4f} | {cells['@50']:.4f} | {cells['@100']:.4f} | "
                    f"{cells['tau']:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
