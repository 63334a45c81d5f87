"""Does accounting for epochs in flight pay? Freeze-thaw with W workers on benchmark pools, per pending strategy.

Each study runs the library's default searcher on a task's tabulated pool with ``W`` epochs in flight: an epoch
takes the pool's measured training seconds, the driver's rule is followed (a worker that frees gets the next
decision at once, the epochs still running are pending rows), and the normalised validation regret after 25, 50
and 100 epochs is recorded. ``W = 1`` is the sequential study every strategy reduces to.

    python recipes/bench_pending.py --tasks recipes/bench/cnn-digits.yaml recipes/bench/hub-mnist1d.yaml \\
        --seeds 3 --workers 8 --strategies constant_liar kriging_believer ignore
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from pathlib import Path

import numpy as np
import torch

from lightning_fms.bench.methods import PoolModules
from lightning_fms.bench.metrics import normalised_regret, to_scores
from lightning_fms.bench.pool import load_pool
from lightning_fms.bench.task import BenchTask
from lightning_fms.search.optimizer import FreezeThawOptimizer
from lightning_fms.search.searcher import resolve_weights, seeded_searcher
from lightning_fms.search.seeds import derive_seed

CHECKPOINTS = (25, 50, 100)


def run_study(pool, seed: int, workers: int, strategy: str, budget: int) -> dict:
    """One study: regret at each checkpoint, decisions made, surrogate seconds."""
    space = pool.space
    weights = resolve_weights("fms", space, "auto")
    modules = PoolModules(pool) if weights != "none" else None
    search = seeded_searcher(
        "fms", space, pool.epochs, seed=derive_seed("pending", "searcher", seed), modules=modules, weights=weights,
        device="cpu", pending=strategy,
    )  # fmt: skip
    order = np.random.default_rng(derive_seed("bench", "order", seed)).permutation(pool.size)
    opt = FreezeThawOptimizer(
        space, search, budget=budget, max_epochs_per_trial=pool.epochs, mode=pool.mode,
        seed=derive_seed("bench", "optimizer", seed), configurations=[pool.configs[j] for j in order], modules=modules,
    )  # fmt: skip
    scores = to_scores(pool.val, pool.mode)
    best, worst = float(np.nanmax(scores)), float(np.nanmin(scores))
    clock, sequence, in_flight = 0.0, 0, []
    incumbent, regret = -np.inf, {}
    start = time.perf_counter()
    while True:
        while len(in_flight) < workers and (s := opt.claim({"worker": len(in_flight)})) is not None:
            index = pool.index_of(s.config)
            heapq.heappush(in_flight, (clock + float(pool.train_seconds[index, s.epoch - 1]), sequence, s, index))
            sequence += 1
        if not in_flight:
            break
        clock, _, s, index = heapq.heappop(in_flight)
        value = float(pool.val[index, s.epoch - 1])
        opt.complete(s.trial_id, s.epoch, value, float(pool.train_seconds[index, s.epoch - 1]))
        if np.isfinite(scores[index, s.epoch - 1]):
            incumbent = max(incumbent, float(scores[index, s.epoch - 1]))
        for point in CHECKPOINTS:
            if opt.epochs_spent == point:
                regret[point] = float(normalised_regret(incumbent, best, worst)) if np.isfinite(incumbent) else 1.0
    return {"regret": regret, "trials": len(opt.trials), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[8])
    parser.add_argument("--strategies", nargs="+", default=["constant_liar", "kriging_believer", "ignore"])
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--out", default="runs/bench-pending.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for task_file in args.tasks:
        pool = load_pool(BenchTask.from_file(task_file))
        runs = [(1, "ignore")] + [(w, s) for w in args.workers for s in args.strategies]
        for workers, strategy in runs:
            for seed in range(args.seeds):
                key = f"{pool.name}|{workers}|{strategy}|{seed}"
                if key in results:
                    continue
                results[key] = run_study(pool, seed, workers, strategy, args.budget)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1))
                print(key, results[key], flush=True)
    table: dict[tuple[str, int, str], list[dict]] = {}
    for key, value in results.items():
        task, workers, strategy, _ = key.split("|")
        table.setdefault((task, int(workers), strategy), []).append(value["regret"])
    print("| task | workers | pending | " + " | ".join(f"regret @{p}" for p in CHECKPOINTS) + " | seeds |")
    print("|---|---|---|" + "---|" * len(CHECKPOINTS) + "---|")
    for (task, workers, strategy), regrets in sorted(table.items()):
        means = [np.mean([r.get(str(p), r.get(p, np.nan)) for r in regrets]) for p in CHECKPOINTS]
        label = "(sequential)" if workers == 1 else strategy
        print(f"| {task} | {workers} | {label} | " + " | ".join(f"{m:.4f}" for m in means) + f" | {len(regrets)} |")


if __name__ == "__main__":
    main()
