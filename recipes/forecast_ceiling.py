"""How well can any hyperparameter model rank a pool's final values from a few of them? A ceiling for Kendall tau.

The benchmark's Kendall tau ranks all of a pool's configurations by their forecast final value after 100
epochs spent, when most configurations have never been trained: their forecast rests on the hyperparameters
(and hub entry) alone. This script gives a plain GP the *true final values* of ``n`` random configurations
(far more than a 100-epoch study knows: it sees only a few complete curves) and measures the tau of its
forecast on the others:

    python recipes/forecast_ceiling.py --tasks cnn-digits cnn-mnist hub-digits --train 40 128 205
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.stats import kendalltau

from lightning_fms.bench.pool import load_pool
from lightning_fms.bench.task import BenchTask
from lightning_fms.surrogate import SurrogateRows, build_surrogate


def final_value_rows(x: torch.Tensor) -> SurrogateRows:
    """Rows that predict the final epoch of configurations encoded as ``x`` ``[N, D]`` (no curve, no weights)."""
    n = x.shape[0]
    return SurrogateRows(
        x=x, budget=torch.ones(n), curves=torch.zeros(n, 1), curve_lengths=torch.zeros(n, dtype=torch.long)
    )


def ceiling(task: str, train_sizes: list[int], repeats: int) -> None:
    """Print the tau of a plain GP fitted on the true final values of ``n`` configurations, for each ``n``."""
    pool = load_pool(BenchTask.from_file(f"recipes/bench/{task}.yaml"), build=False)
    x = pool.space.encode_many(pool.configs).float()
    y = torch.tensor(np.nan_to_num(pool.val[:, -1], nan=float(np.nanmin(pool.val)))).float()
    for n in train_sizes:
        taus = []
        for repeat in range(repeats):
            order = np.random.default_rng(repeat).permutation(pool.size)
            train, test = torch.tensor(order[:n]), torch.tensor(order[n:])
            gp = build_surrogate("gp", x_dim=x.shape[1], curve_length=1, device="cpu")
            gp.fit(final_value_rows(x[train]), y[train], seed=repeat)
            mean, _ = gp.posterior(final_value_rows(x[test]))
            taus.append(kendalltau(mean.numpy(), y[test].numpy())[0])
        print(f"| {task} | {n} | {np.mean(taus):.3f} |", flush=True)


def main() -> None:
    """Print a markdown table: task, configurations whose final value the GP knows, tau on the rest."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", required=True, help="task names under recipes/bench/")
    parser.add_argument("--train", type=int, nargs="+", default=[40, 128, 205])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| task | final values known | Kendall tau on the other configurations |")
    print("|---|---|---|")
    for task in args.tasks:
        ceiling(task, args.train, args.repeats)


if __name__ == "__main__":
    main()
