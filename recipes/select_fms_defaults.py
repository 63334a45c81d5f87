"""Compare variants of a freeze-thaw searcher on benchmark pools: how the fms defaults were chosen.

Each variant is a JSON object of :func:`run_variant` keyword arguments (searcher, weights, curve, surrogate
options, promotion probability, hidden hub). Every run spends 100 epochs on a pool exactly as the benchmark's
freeze-thaw methods do (same per-seed configuration order and optimizer seeds), then reports the normalised
regret of the validation-selected incumbent, Kendall's tau of the forecast final value of every pool
configuration, the trials started and the decision seconds. Means over the seeds, one line per variant and task:

    python recipes/select_fms_defaults.py --tasks cnn-digits cnn-mnist hub-digits --seeds 0 1 2 3 \\
        --variant 'gp={"searcher": "gp"}' --variant 'fms={"searcher": "fms", "weights": "summary"}'

The pools must be built (``python -m lightning_fms.bench.pool recipes/bench/TASK.yaml``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from lightning_fms.bench.ledger import BudgetSpent, Ledger
from lightning_fms.bench.methods import PoolModules
from lightning_fms.bench.metrics import RegretBounds, normalised_regret, rank_correlation, to_scores
from lightning_fms.bench.pool import load_pool
from lightning_fms.bench.pool_data import Pool
from lightning_fms.bench.task import BenchTask
from lightning_fms.search.optimizer import FreezeThawOptimizer
from lightning_fms.search.searcher import seeded_searcher
from lightning_fms.search.seeds import derive_seed
from lightning_fms.threads import torch_threads


def run_variant(
    pool: Pool,
    seed: int,
    searcher: str,
    weights: str = "none",
    curve: str = "cnn",
    sopts: dict[str, Any] | None = None,
    p: float | None = None,
    hide: bool = False,
    budget: int = 100,
) -> dict[str, float]:
    """One run of a variant on a pool: regret, Kendall tau at the end, trials started, decision seconds."""
    modules = PoolModules(pool) if weights != "none" else None
    ledger = Ledger(pool, budget)
    search = seeded_searcher(
        searcher,
        pool.space,
        pool.epochs,
        seed=derive_seed("bench", "searcher", (searcher, weights, curve), seed),
        modules=modules,
        weights=weights,
        curve=curve,
        device="cpu",
        surrogate_options=sopts or {},
        promotion_probability=p,
        hide_hub=hide,
    )
    order = np.random.default_rng(derive_seed("bench", "order", seed)).permutation(pool.size)
    opt = FreezeThawOptimizer(
        pool.space,
        search,
        budget=budget,
        max_epochs_per_trial=pool.epochs,
        mode=pool.mode,
        seed=derive_seed("bench", "optimizer", seed),
        configurations=[pool.configs[j] for j in order],
        modules=modules,
    )
    deciding = 0.0
    try:
        while not ledger.done:
            start = time.perf_counter()
            suggestion = opt.ask()
            deciding += time.perf_counter() - start
            if suggestion is None:
                break
            index = pool.index_of(suggestion.config)
            value = ledger.train(index, suggestion.epoch)
            start = time.perf_counter()
            seconds = float(pool.train_seconds[index, suggestion.epoch - 1])
            opt.tell(suggestion.trial_id, suggestion.epoch, value, seconds)
            deciding += time.perf_counter() - start
    except BudgetSpent:
        pass
    bounds = RegretBounds.of(pool.val, pool.test, pool.mode)
    regret = float(normalised_regret(ledger.rows[-1]["best_val"], bounds.best_val, bounds.worst_val))
    mean, _ = opt.predict(pool.configs)
    tau = rank_correlation(mean, to_scores(pool.val[:, -1], pool.mode))["kendall_tau"]
    return {"regret": regret, "tau": tau, "trials": float(len(opt.trials)), "decision_s": deciding}


def main() -> None:
    """Print one line per variant and task: mean regret, Kendall tau, trials started, decision seconds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", required=True, help="task names under recipes/bench/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--variant", action="append", required=True, help='NAME=JSON, e.g. gp={"searcher": "gp"}')
    args = parser.parse_args()
    pools = {t: load_pool(BenchTask.from_file(f"recipes/bench/{t}.yaml"), build=False) for t in args.tasks}
    print("| variant | task | regret @100 | Kendall tau @100 | trials started | decision s |")
    print("|---|---|---|---|---|---|")
    for text in args.variant:
        name, spec = text.split("=", 1)
        options = json.loads(spec)
        for task, pool in pools.items():
            with torch_threads(1):
                runs = [run_variant(pool, seed, **options) for seed in args.seeds]
            mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
            print(
                f"| {name} | {task} | {mean['regret']:.4f} | {mean['tau']:.3f} | {mean['trials']:.1f} | "
                f"{mean['decision_s']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
