"""HPO with the frozen-layer fidelity (epochs x trainable fraction) against epochs only, same budget and seeds.

Runs the demo study (``recipes/demo.yaml``: 8 pretrained digit networks of 5 families, digits 5-9) with
``tuner.frozen_layers`` off and on (and a 20% test split held out), for each seed, with real Lightning
training, and prints a markdown table: best validation accuracy found, its regret against the best found
by any run, the test accuracy of each study's ``best.ckpt``, epochs trained, budget charged and wall
seconds. ``--cost-table`` instead compares the FLOP cost model with measured training-step times.

Usage::

    python recipes/bench_frozen_layers_hpo.py --budget 40 --seeds 0 1 2 3 4 --out runs/bench-frozen-hpo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from lightning_fms import FMSTuner, Recipe, load_best_weights

VARIANTS = {"epochs only": False, "epochs x frozen layers": True}


def test_accuracy(tuner: FMSTuner, config: dict) -> float:
    """Accuracy of the study's ``best.ckpt`` on the target task's test split."""
    module, data = tuner.executor.build(config, seed=0)
    module.load_state_dict(load_best_weights(tuner.study.path))
    data.setup("test")
    module.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            correct += int((module(x).argmax(-1) == y).sum())
            total += len(y)
    return correct / total


def run_one(config_path: Path, out: Path, seed: int, budget: int, frozen: bool) -> dict:
    data = yaml.safe_load(config_path.read_text())
    data["tuner"] = {**data.get("tuner", {}), "frozen_layers": frozen}
    # hold out a test split (20%) that neither training nor selection sees
    data["data"]["init_args"] = {**data["data"].get("init_args", {}), "test_fraction": 0.2}
    data.update(seed=seed, budget=budget)
    recipe = Recipe.from_dict(data, base_dir=config_path.parent)
    study_dir = out / f"{'2d' if frozen else '1d'}-seed{seed}"
    start = time.perf_counter()
    tuner = recipe.build_tuner(study_dir, progress=False)
    result = tuner.run()
    wall = time.perf_counter() - start
    opt = tuner.optimizer
    return {
        "frozen": frozen,
        "seed": seed,
        "best_val": float(result.best_value),
        "test_acc": test_accuracy(tuner, result.best_config),
        "epochs": opt.epochs_spent,
        "budget_spent": opt.budget_spent,
        "frozen_epochs": sum(1 for t in opt.trials.values() for f in t.fractions if f < 1.0),
        "trials": len(opt.trials),
        "wall_s": wall,
        "curve": [(d.get("budget_spent", d["epochs_spent"]), d["value"]) for d in opt.decisions],
    }


def cost_table(fractions: tuple[float, ...] = (0.25, 0.5), steps: int = 60) -> None:
    """Print, per demo hub entry, the FLOP cost model next to the measured time of a training step (batch 32)."""
    import statistics

    from lightning_fms.frozen.costs import fraction_costs
    from lightning_fms.frozen.levels import units_for_fraction
    from lightning_fms.frozen.units import set_trainable_units
    from lightning_fms.zoo import ImageClassifier, build_demo_hub

    hub = build_demo_hub()
    batch = (torch.rand(32, 1, 8, 8), torch.randint(0, 5, (32,)))
    print("| hub entry | units | " + " | ".join(f"FLOP cost @{f:g} | measured @{f:g}" for f in fractions) + " |")
    print("|---|---|" + "---|---|" * len(fractions))
    for name in hub.names:
        module = ImageClassifier(hub.build(name), lr=0.01, reset_head=True, num_classes=5)
        n, costs = fraction_costs(module, module.net, batch, fractions)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)

        def step_seconds(k: int, module: ImageClassifier = module, optimizer: torch.optim.SGD = optimizer) -> float:
            set_trainable_units(module.net, k)
            times = []
            for i in range(steps):
                start = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(module(batch[0]), batch[1])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if i >= 10:
                    times.append(time.perf_counter() - start)
            return statistics.median(times)

        full = step_seconds(n)
        cells = [f"{c:.2f} | {step_seconds(units_for_fraction(f, n)) / full:.2f}" for f, c in zip(fractions, costs)]
        print(f"| {name} | {n} | " + " | ".join(cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("recipes/demo.yaml"))
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-frozen-hpo"))
    parser.add_argument("--cost-table", action="store_true", help="only compare the cost model with step times")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.cost_table:
        cost_table()
        return
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        for name, frozen in VARIANTS.items():
            cached = args.out / f"{'2d' if frozen else '1d'}-seed{seed}.json"
            if cached.exists():
                record = json.loads(cached.read_text())
            else:
                record = run_one(args.config, args.out, seed, args.budget, frozen)
                cached.write_text(json.dumps(record))
            runs.append(record)
            print(
                f"{name:24s} seed {seed}: best val {record['best_val']:.4f} test {record['test_acc']:.4f} "
                f"epochs {record['epochs']} ({record['frozen_epochs']} frozen) wall {record['wall_s']:.0f}s",
                flush=True,
            )
    best = max(r["best_val"] for r in runs)

    def mean_sd(values: list[float]) -> str:
        t = torch.tensor(values, dtype=torch.float64)
        return f"{t.mean():.4f} ± {t.std(unbiased=len(values) > 1):.4f}" if len(values) > 1 else f"{t.mean():.4f}"

    def best_at(record: dict, spent: float) -> float:
        seen = [v for b, v in record["curve"] if b <= spent + 1e-9 and v == v]
        return max(seen) if seen else float("nan")

    print(
        f"\nbudget {args.budget} full-epoch equivalents, seeds {args.seeds}; regret against {best:.4f}, "
        "the best validation accuracy any run found\n"
    )
    half = args.budget / 2
    print(
        f"| variant | best val acc | regret @{half:g} | regret @{args.budget} | test acc of best.ckpt | epochs "
        "trained | of them frozen | trials | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, frozen in VARIANTS.items():
        mine = [r for r in runs if r["frozen"] == frozen]
        print(
            f"| {name} | {mean_sd([r['best_val'] for r in mine])} | "
            f"{mean_sd([best - best_at(r, half) for r in mine])} | {mean_sd([best - r['best_val'] for r in mine])} | "
            f"{mean_sd([r['test_acc'] for r in mine])} | {mean_sd([r['epochs'] for r in mine])} | "
            f"{mean_sd([r['frozen_epochs'] for r in mine])} | {mean_sd([r['trials'] for r in mine])} | "
            f"{mean_sd([r['wall_s'] for r in mine])} |"
        )


if __name__ == "__main__":
    main()
