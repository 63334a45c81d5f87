"""Per-epoch overhead of the Ray executor against the in-process executor, after warm-up.

The same tiny model (the tiny hub's ``mlp-xs`` fine-tuned on digits 5-9, batch 128) trains one epoch per job,
``--epochs`` times in each executor after ``--warmup`` epochs that are not timed, at one torch thread. For Ray, a
1-worker :class:`~lightning_fms.parallel.ray_executor.RayExecutor` (a local single-host cluster unless
``--address``) runs each job through ``submit`` and ``wait``, as the driver does; the overhead of an epoch is its
round trip (``submit`` to ``wait`` returning) minus the time the epoch took inside the worker
(:attr:`~lightning_fms.training.executor.EpochOutcome.wall_s`). The two executors alternate in blocks of
``--block`` epochs, so other load on the machine hits both alike.

    python recipes/bench_ray_overhead.py --epochs 60 --warmup 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lightning_fms.parallel.ray_executor import RayExecutor
from lightning_fms.search.space import SearchSpace
from lightning_fms.testing import tiny_hub
from lightning_fms.training.executor import EpochJob
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.zoo import DigitsDataModule, ImageClassifier

CONFIG = {"hub": "mlp-xs", "model.lr": 0.05}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60, help="timed epochs per executor")
    parser.add_argument("--warmup", type=int, default=5, help="untimed epochs per executor first")
    parser.add_argument("--block", type=int, default=10, help="epochs per executor before switching")
    parser.add_argument("--address", default=None, help="attach to this Ray cluster (default: a local one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    hub = tiny_hub(folder / "hub")
    space = SearchSpace.from_dict(
        {"hub": {"type": "hub"}, "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True}},
        hub_entries=hub.names,
    )
    inner = InProcessExecutor.from_factories(
        ImageClassifier,
        DigitsDataModule,
        space,
        hub,
        monitor="val_acc",
        datamodule_options={"task": "target", "batch_size": 128},
        trainer_options={"accelerator": "cpu"},
    )
    started = time.perf_counter()
    ray = RayExecutor(inner, address=args.address, workers=1)
    ray.start()
    start_s = time.perf_counter() - started
    counter = iter(range(10**9))

    def job(name: str) -> EpochJob:
        trial = next(counter)
        return EpochJob(
            trial_id=trial,
            config=dict(CONFIG),
            epoch=1,
            resume_from=None,
            checkpoint_out=folder / name / "trials" / str(trial) / "epoch-1.ckpt",
            log_dir=folder / name / "trials" / str(trial),
            seed=0,
            monitor="val_acc",
            cap=5,
        )

    def in_process_epoch() -> tuple[float, float]:
        begin = time.perf_counter()
        outcome = inner.run_epoch(job("local"))
        assert outcome.error is None, outcome.error
        return time.perf_counter() - begin, outcome.wall_s

    def ray_epoch() -> tuple[float, float]:
        begin = time.perf_counter()
        ray.submit(job("ray"))
        (finished,) = ray.wait()
        round_trip = time.perf_counter() - begin
        assert finished.outcome is not None and finished.outcome.error is None, finished
        return round_trip, finished.outcome.wall_s

    for _ in range(args.warmup):
        in_process_epoch()
        ray_epoch()
    local: list[tuple[float, float]] = []
    remote: list[tuple[float, float]] = []
    while len(local) < args.epochs:
        for _ in range(min(args.block, args.epochs - len(local))):
            local.append(in_process_epoch())
        for _ in range(min(args.block, args.epochs - len(remote))):
            remote.append(ray_epoch())
    ray.close()

    overhead = [(rt - inside) * 1e3 for rt, inside in remote]
    local_overhead = [(rt - inside) * 1e3 for rt, inside in local]
    result = {
        "epochs": args.epochs,
        "warmup": args.warmup,
        "ray_start_s": round(start_s, 2),
        "ray_overhead_ms": {"median": statistics.median(overhead), "p90": quantile(overhead, 0.9)},
        "in_process_overhead_ms": {"median": statistics.median(local_overhead), "p90": quantile(local_overhead, 0.9)},
        "ray_epoch_ms": {
            "median": statistics.median(r * 1e3 for r, _ in remote),
            "p90": quantile([r * 1e3 for r, _ in remote], 0.9),
        },
        "in_process_epoch_ms": {
            "median": statistics.median(r * 1e3 for r, _ in local),
            "p90": quantile([r * 1e3 for r, _ in local], 0.9),
        },
        "machine": f"{platform.machine()}, {platform.python_version()}, torch {torch.__version__}",
    }
    print(json.dumps(result, indent=2))
    print()
    print("| executor | per-epoch time, median (p90) | overhead beyond the epoch itself, median (p90) |")
    print("|---|---|---|")
    for name, epoch_key, over in (
        ("in-process", "in_process_epoch_ms", "in_process_overhead_ms"),
        ("Ray, 1 warm worker", "ray_epoch_ms", "ray_overhead_ms"),
    ):
        e, o = result[epoch_key], result[over]
        print(f"| {name} | {e['median']:.1f} ms ({e['p90']:.1f}) | {o['median']:.2f} ms ({o['p90']:.2f}) |")


if __name__ == "__main__":
    main()
