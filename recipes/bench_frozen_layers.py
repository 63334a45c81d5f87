"""Frozen layers as a fidelity: does training only the last k layer units rank configurations like full training?

Part 1 (rank agreement). For a ResNet-style and a transformer-style model of the demo hub (``resnet-m``:
TinyResNet width 16, 5 units; ``vit-s``: TinyViT dim 32 depth 2, 5 units), ``--configs`` random fine-tuning
configurations (lr log-uniform, weight decay log-uniform, momentum, batch size) are each trained for ``--epochs``
epochs on the digits target task with :class:`~lightning_fms.zoo.ImageClassifier` and the
:class:`~lightning_fms.frozen.callback.FrozenUnits` callback, once per k (every k from 1 to n). Spearman's rho and
Kendall's tau-b between the final validation accuracies at k and at full training (k = n) are reported, with a
bootstrap 95% interval for rho, the overlap of the top-5 configurations and the regret of picking the best
configuration at k (full-training accuracy of the best configuration minus that of the one k ranks first). A second
full-training run with another seed gives the noise ceiling: the agreement of full training with itself.
``--init pretrained`` fine-tunes the hub weights (what the tuner does: frozen units keep pretrained weights);
``--init scratch`` trains from random initialisation as in the paper (frozen units stay random).

Part 2 (cost). For each k, one training step (forward, backward, SGD with momentum) is timed in a fresh
subprocess: the median CPU time (``time.process_time``, robust to other processes on a shared machine) and the
minimum wall time of ``--steps`` steps after warm-up, on the two hub architectures and on larger variants of
them (``resnet-l``: TinyResNet width 32, 2 blocks per stage, 16x16 inputs; ``vit-l``: TinyViT dim 96, depth 6,
patch 2, 16x16 inputs), since the hub models are too small for memory effects to stand out on a CPU. Memory is
reported two ways: the bytes the step holds (weights + SGD momentum + gradients + the tensors autograd saved for
backward, counted with ``torch.autograd.graph.saved_tensors_hooks``) and the measured growth of the process's peak
resident set size during the steps (``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``,
with glibc's mmap threshold lowered so that freed tensors leave the resident set). ``tracemalloc`` cannot be used:
it only sees Python's allocator, not the tensors' memory.

    python recipes/bench_frozen_layers.py            # full form (2 inits x 2 models x 50 configs x 6 runs): 12-20 min
    python recipes/bench_frozen_layers.py --quick    # a smoke run, about a minute
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODELS = {"resnet": "resnet-m", "vit": "vit-s"}
"""Rank-agreement models: short name -> demo hub entry."""

COST_MODELS: dict[str, dict[str, Any]] = {
    "resnet-m": {"class_path": "lightning_fms.zoo.TinyResNet", "args": {"width": 16}, "image": 8, "batch": 128},
    "resnet-l": {
        "class_path": "lightning_fms.zoo.TinyResNet",
        "args": {"width": 32, "blocks_per_stage": 2},
        "image": 16,
        "batch": 128,
    },
    "vit-s": {
        "class_path": "lightning_fms.zoo.TinyViT",
        "args": {"patch_size": 4, "dim": 32, "depth": 2, "heads": 4},
        "image": 8,
        "batch": 128,
    },
    "vit-l": {
        "class_path": "lightning_fms.zoo.TinyViT",
        "args": {"patch_size": 2, "dim": 96, "depth": 6, "heads": 4},
        "image": 16,
        "batch": 64,
    },
}
"""Cost models: name -> architecture, input side and batch size."""

BATCH_SIZES = (16, 32, 64, 128)

PAPER_NOTE = (
    "Paper (Carstensen et al., AutoML 2025, arXiv 2504.10735), from the team's research notes: Spearman > 0.95 "
    "to full training with ~40% of layers trainable and >= 3x less memory, >= 4x faster steps (2nd-hand, from "
    "summaries); authors' raw CSVs (L40S, CIFAR-10 at 224 px, Adam, memory = weights + Adam state after the "
    "step): ResNet-18 b128 133 -> 216 MB (1.6x), 22 -> 36 ms (1.6x); ResNet-50 b128 180 -> 360 MB (2.0x), "
    "53 -> 191 ms (3.6x); ResNet-50 b64 2.3x, 4.1x; ResNet-101 b64 2.6x, 4.1x; ResNet-152 b128 2.4x, 3.4x "
    "(fewest trainable vs full)."
)


# --------------------------------------------------------------------------------------------- rank agreement


def sample_configs(count: int, seed: int) -> list[dict[str, Any]]:
    """Random fine-tuning configurations (the same for every model, init and k)."""
    rng = np.random.default_rng(seed)
    return [
        {
            "lr": float(10 ** rng.uniform(-3.0, np.log10(0.5))),
            "weight_decay": float(10 ** rng.uniform(-6.0, -2.0)),
            "momentum": float(rng.uniform(0.0, 0.95)),
            "batch_size": int(rng.choice(BATCH_SIZES)),
        }
        for _ in range(count)
    ]


def _import_class(class_path: str) -> type[torch.nn.Module]:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def train_final_accuracy(
    net: torch.nn.Module, config: dict[str, Any], k: int, epochs: int, seed: int, datamodule_seed: int
) -> float:
    """Fine-tune ``net`` (in place) with ``config`` at ``k`` trainable units; return the last validation accuracy."""
    import lightning.pytorch as pl

    from lightning_fms.frozen.callback import FrozenUnits
    from lightning_fms.training.seeder import TrialSeeder
    from lightning_fms.zoo import DigitsDataModule, ImageClassifier, quiet_lightning

    module = ImageClassifier(
        net,
        lr=config["lr"],
        weight_decay=config["weight_decay"],
        momentum=config["momentum"],
        max_epochs=epochs,
        num_classes=5,
        head_seed=seed,
    )
    datamodule = DigitsDataModule(task="target", batch_size=config["batch_size"], seed=datamodule_seed)
    with quiet_lightning():
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[FrozenUnits(k), TrialSeeder(seed)],
        )
        trainer.fit(module, datamodule=datamodule)
    value = trainer.callback_metrics.get("val_acc")
    return float(value) if value is not None else float("nan")


def run_rank_agreement(args: argparse.Namespace, configs: list[dict[str, Any]]) -> dict[str, Any]:
    """Train every (init, model, config, k) and the second-seed full runs; return the raw accuracies."""
    from lightning_fms.frozen.units import layer_units, trainable_fraction
    from lightning_fms.search.seeds import derive_seed
    from lightning_fms.zoo import build_demo_hub

    hub = build_demo_hub(args.hub_dir, verbose=True)
    results: dict[str, Any] = {}
    for init in args.init:
        for short in args.models:
            entry = hub.entry(MODELS[short])
            pretrained = hub.build(entry.name)
            units = layer_units(pretrained)
            n = len(units)
            ks = list(range(1, n + 1))
            runs: dict[str, list[float]] = {str(k): [] for k in ks}
            runs["full-seed2"] = []
            fit_seconds: dict[str, list[float]] = {str(k): [] for k in ks}
            start = time.perf_counter()
            for index, config in enumerate(configs):
                for k, rep in [(k, 0) for k in ks] + [(n, 1)]:
                    seed = derive_seed(args.seed, "config", index, rep)
                    if init == "pretrained":
                        net = copy.deepcopy(pretrained)
                    else:
                        with torch.random.fork_rng(devices=[]):
                            torch.manual_seed(seed)
                            net = _import_class(entry.class_path)(**entry.init_args)
                    fit_start = time.perf_counter()
                    acc = train_final_accuracy(net, config, k, args.epochs, seed, datamodule_seed=args.seed)
                    runs["full-seed2" if rep else str(k)].append(acc)
                    if not rep:
                        fit_seconds[str(k)].append(time.perf_counter() - fit_start)
                if args.verbose:
                    print(
                        f"  {init:<10} {short:<6} config {index + 1:>3}/{len(configs)}  "
                        + " ".join(f"{runs[str(k)][-1]:.3f}" for k in ks)
                        + f"  | {runs['full-seed2'][-1]:.3f}  ({time.perf_counter() - start:.0f}s)",
                        flush=True,
                    )
            results[f"{init}/{short}"] = {
                "init": init,
                "model": short,
                "hub_entry": entry.name,
                "units": [u.name for u in units],
                "fractions": [trainable_fraction(pretrained, k) for k in ks],
                "runs": runs,
                "fit_seconds": fit_seconds,
                "seconds": time.perf_counter() - start,
            }
    return results


def agreement(low: np.ndarray, full: np.ndarray, rng: np.random.Generator, bootstrap: int) -> dict[str, float]:
    """Spearman (with a bootstrap 95% interval), Kendall tau-b, top-5 overlap and regret of ``low`` vs ``full``."""
    from scipy import stats

    rho = float(stats.spearmanr(low, full).statistic)
    tau = float(stats.kendalltau(low, full).statistic)
    draws = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(low), len(low))
        if np.ptp(low[idx]) > 0 and np.ptp(full[idx]) > 0:
            draws.append(stats.spearmanr(low[idx], full[idx]).statistic)
    lo, hi = (np.nanpercentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan)) if bootstrap else (np.nan, np.nan)
    order_low = np.lexsort((np.arange(len(low)), -low))
    order_full = np.lexsort((np.arange(len(full)), -full))
    top = min(5, len(low))
    overlap = len(set(order_low[:top]) & set(order_full[:top])) / top
    regret = float(full.max() - full[order_low[0]])
    return {"spearman": rho, "spearman_lo": float(lo), "spearman_hi": float(hi), "kendall": tau,
            "top5": overlap, "regret": regret}  # fmt: skip


def rank_table(result: dict[str, Any], bootstrap: int, seed: int) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table of one (init, model) result, and its rows."""
    runs = {key: np.asarray(values, dtype=float) for key, values in result["runs"].items()}
    n = len(result["units"])
    full = runs[str(n)]
    rng = np.random.default_rng(seed)
    lines = [
        "| k (lowest trainable unit) | layers trainable | params trainable | Spearman [95% CI] | Kendall tau-b "
        "| top-5 overlap | regret@1 | mean val acc | s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows: list[dict[str, Any]] = []
    for k in range(1, n + 1):
        label, acc = f"{k} ({result['units'][-k]})", np.nanmean(runs[str(k)])
        run_s = float(np.median(result["fit_seconds"][str(k)]))
        if k == n:
            lines.append(f"| {k} (all) | 100% | 100% | 1 (reference) | 1 | 1.0 | 0 | {acc:.3f} | {run_s:.2f} |")
            rows.append({"k": k, "layers": 1.0, "params": 1.0, "mean_acc": acc, "run_s": run_s})
            continue
        a = agreement(runs[str(k)], full, rng, bootstrap)
        rows.append(
            {"k": k, "layers": k / n, "params": result["fractions"][k - 1], "mean_acc": acc, "run_s": run_s, **a}
        )
        lines.append(
            f"| {label} | {k / n:.0%} | {result['fractions'][k - 1]:.1%} | {a['spearman']:.3f} "
            f"[{a['spearman_lo']:.2f}, {a['spearman_hi']:.2f}] | {a['kendall']:.3f} | {a['top5']:.1f} "
            f"| {a['regret']:.3f} | {acc:.3f} | {run_s:.2f} |"
        )
    a = agreement(runs["full-seed2"], full, rng, bootstrap)
    acc = np.nanmean(runs["full-seed2"])
    rows.append({"k": "full-seed2", "layers": 1.0, "params": 1.0, "mean_acc": acc, **a})
    lines.append(
        f"| all, 2nd seed (noise ceiling) | 100% | 100% | {a['spearman']:.3f} [{a['spearman_lo']:.2f}, "
        f"{a['spearman_hi']:.2f}] | {a['kendall']:.3f} | {a['top5']:.1f} | {a['regret']:.3f} | {acc:.3f} | |"
    )
    return "\n".join(lines), rows


def summary_table(tables: dict[str, list[dict[str, Any]]], costs: list[dict[str, Any]]) -> str:
    """Our headline numbers next to the paper's."""
    lines = ["| quantity | ours | paper |", "|---|---|---|"]
    for key, rows in tables.items():
        near = min(
            (r for r in rows if isinstance(r["k"], int) and r["layers"] < 1), key=lambda r: abs(r["layers"] - 0.4)
        )
        ceiling = next(r for r in rows if r["k"] == "full-seed2")
        lines.append(
            f"| Spearman / Kendall vs full, {key}, {near['layers']:.0%} of layers (k={near['k']}) "
            f"| {near['spearman']:.3f} / {near['kendall']:.3f} (noise ceiling {ceiling['spearman']:.3f} / "
            f"{ceiling['kendall']:.3f}) | Spearman > 0.95 at ~40% of layers (2nd-hand) |"
        )
    for name in dict.fromkeys(r["model"] for r in costs):
        rows = [r for r in costs if r["model"] == name]
        low, full = rows[0], rows[-1]

        def total(r: dict[str, Any]) -> float:
            return r["weights_mb"] + r["optimizer_mb"] + r["grads_mb"] + r["activations_mb"]

        persistent = (full["weights_mb"] + full["optimizer_mb"]) / (low["weights_mb"] + low["optimizer_mb"])
        lines.append(
            f"| {name}: k=1 vs full: step CPU time / step memory / weights+optimizer state | "
            f"{full['step_ms'] / low['step_ms']:.1f}x / {total(full) / total(low):.1f}x / {persistent:.1f}x "
            f"(peak RSS growth {full['rss_growth_mb']:.0f} -> {low['rss_growth_mb']:.0f} MB) "
            "| 1.6x-4.1x faster; weights+Adam 1.6x-2.6x (ResNet-18..152 CSVs); >= 4x / >= 3x (2nd-hand) |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- cost


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def measure_cost(name: str, k: int, steps: int, warmup: int) -> dict[str, Any]:
    """Time and memory of one training step of cost model ``name`` at ``k`` (run in a fresh process)."""
    from lightning_fms.frozen.units import layer_units, set_trainable_units, trainable_fraction

    torch.set_num_threads(1)
    spec = COST_MODELS[name]
    torch.manual_seed(0)
    net = _import_class(spec["class_path"])(image_size=spec["image"], num_classes=10, **spec["args"])
    n = len(layer_units(net))
    set_trainable_units(net, k)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.rand(spec["batch"], 1, spec["image"], spec["image"])
    y = torch.randint(0, 10, (spec["batch"],))
    param_ptrs = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current resident set
        rss_ok = True
    except OSError:
        rss_ok = False
    rss_before = _status_kib("VmRSS")
    cpu_times, wall_times = [], []
    grad_bytes = 0
    for step in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad()
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = torch.nn.functional.cross_entropy(net(x), y)
        else:
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        if step == 0:
            grad_bytes = sum(p.grad.nbytes for p in net.parameters() if p.grad is not None)
        optimizer.step()
        if step >= warmup:
            cpu_times.append(time.process_time() - cpu_start)
            wall_times.append(time.perf_counter() - start)
    peak_growth = (_status_kib("VmHWM") - rss_before) / 1024 if rss_ok else float("nan")
    weight_bytes = sum(p.nbytes for p in net.parameters())
    state_bytes = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {
        "model": name,
        "k": k,
        "units": n,
        "fraction": trainable_fraction(net, k),
        "step_ms": 1000 * statistics.median(cpu_times),
        "step_wall_min_ms": 1000 * min(wall_times),
        "weights_mb": weight_bytes / 2**20,
        "optimizer_mb": state_bytes / 2**20,
        "grads_mb": grad_bytes / 2**20,
        "activations_mb": sum(saved.values()) / 2**20,
        "rss_growth_mb": peak_growth,
    }


def run_costs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One subprocess per (cost model, k)."""
    from lightning_fms.frozen.units import layer_units

    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    for name in args.cost_models:
        spec = COST_MODELS[name]
        net = _import_class(spec["class_path"])(image_size=spec["image"], num_classes=10, **spec["args"])
        n = len(layer_units(net))
        for k in range(1, n + 1):
            command = [sys.executable, __file__, "--_measure", name, str(k), "--steps", str(args.steps)]
            command += ["--warmup", str(args.warmup)]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            if args.verbose:
                print(
                    f"  cost {name:<9} k={k}/{n}  {row['step_ms']:7.1f} ms  act {row['activations_mb']:6.1f} MB  "
                    f"rss+ {row['rss_growth_mb']:6.1f} MB",
                    flush=True,
                )
    return rows


def cost_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the cost rows, with ratios against full training of the same model."""
    lines = [
        "| model | k / n | params trainable | CPU ms / step | full / k | wall ms (min) | weights + momentum MB "
        "| grads MB | saved activations MB | step total MB | full / k total | peak RSS growth MB | full / k RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        full = next(r for r in rows if r["model"] == row["model"] and r["k"] == r["units"])
        total = row["weights_mb"] + row["optimizer_mb"] + row["grads_mb"] + row["activations_mb"]
        full_total = full["weights_mb"] + full["optimizer_mb"] + full["grads_mb"] + full["activations_mb"]
        rss_ratio = full["rss_growth_mb"] / row["rss_growth_mb"] if row["rss_growth_mb"] > 0 else float("nan")
        lines.append(
            f"| {row['model']} | {row['k']} / {row['units']} | {row['fraction']:.1%} | {row['step_ms']:.1f} "
            f"| {full['step_ms'] / row['step_ms']:.2f}x | {row['step_wall_min_ms']:.1f} "
            f"| {row['weights_mb'] + row['optimizer_mb']:.2f} "
            f"| {row['grads_mb']:.2f} | {row['activations_mb']:.1f} | {total:.1f} | {full_total / total:.2f}x "
            f"| {row['rss_growth_mb']:.1f} | {rss_ratio:.2f}x |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=int, default=50, help="random configurations per model and init")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of every run")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--init", nargs="+", default=["pretrained", "scratch"], choices=["pretrained", "scratch"])
    parser.add_argument("--cost-models", nargs="*", default=list(COST_MODELS), choices=list(COST_MODELS))
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per (cost model, k)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the Spearman interval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hub-dir", default=None, help="demo hub folder (default: the cache)")
    parser.add_argument("--out", default=None, help="write raw results and tables as JSON here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 configs, 2 epochs, 3 timed steps")
    parser.add_argument("--quiet", dest="verbose", action="store_false")
    parser.add_argument("--_measure", nargs=2, metavar=("MODEL", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        print(json.dumps(measure_cost(args._measure[0], int(args._measure[1]), args.steps, args.warmup)))
        return
    if args.quick:
        args.configs, args.epochs, args.steps, args.warmup, args.bootstrap = 8, 2, 3, 1, 200
        args.cost_models = [m for m in args.cost_models if m.endswith("-m") or m == "vit-s"]
    torch.set_num_threads(1)

    wall = time.perf_counter()
    configs = sample_configs(args.configs, args.seed)
    rank = run_rank_agreement(args, configs)
    costs = run_costs(args) if args.cost_models else []
    seconds = time.perf_counter() - wall

    print()
    print(
        f"# Frozen layers as a fidelity ({args.configs} configurations, {args.epochs} epochs, digits 5-9; "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread; {seconds / 60:.1f} min)"
    )
    tables: dict[str, Any] = {}
    for key, result in rank.items():
        table, rows = rank_table(result, args.bootstrap, args.seed)
        tables[key] = rows
        print(f"\n## {result['init']} {result['model']} ({result['hub_entry']}: units {', '.join(result['units'])})\n")
        print(table)
    if costs:
        print("\n## Cost per training step against k (CPU, 1 thread, SGD with momentum)\n")
        print(cost_table(costs))
    print("\n## Side by side with the paper\n")
    print(summary_table(tables, costs))
    print(f"\n{PAPER_NOTE}")
    if args.out:
        payload = {"args": vars(args), "configs": configs, "rank": rank, "rank_rows": tables, "costs": costs}
        Path(args.out).write_text(json.dumps(payload, indent=1, default=str))


if __name__ == "__main__":
    main()
