"""Simulated cluster: does the central decider keep 8, 64, 256 workers busy? (issue 13, item 7)

Runs the real FMSTuner (its searcher, optimizer, driver, ledger and study directory) with a
``SimulatedExecutor``: N workers on a virtual clock, epochs of lognormal duration (60 s median, log-sd 0.3),
values from seeded synthetic learning curves over a space like the benchmark's (a hub choice, learning rate,
weight decay, momentum, dropout, batch size). With ``--hub tiny`` (the default) the hub is the tiny hub of
``lightning_fms.testing`` (built once into the cache), so ``fms`` reads real modules' weights (the summary
featurizer; the weights after an epoch are ``W_0`` drifted along a direction per configuration); ``--hub none``
drops the hub choice and the weights.

The driver's real time between executor calls goes on the virtual clock (a background fit's time too, while the
driver waits); the optimizer's ``claim``, the searcher's scoring and fits, and the ledger's ``commit``, ``save``,
``write_reports`` and weight snapshots are timed in place (``DriverProfile``) to say where it goes::

    python recipes/simulate_cluster.py --workers 8 64 256 --epochs 3000 --searchers fms dyhpo --json runs/sim.jsonl

Ablations (to measure what a remedy buys): ``--refit inline`` (every decision refits, no background fits),
``--report_interval 0`` (reports rewritten on every commit), ``--no_group_commit`` (one state save per commit),
``--no_posterior_cache`` (decisions with the current fit score every candidate again).

Each finished run appends one JSON line to ``--json`` (rows already in the file are skipped, so the same command
continues a killed table) and the table of every row asked for is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lightning_fms import FMSTuner, SearchSpace
from lightning_fms.parallel.profile import DriverProfile
from lightning_fms.parallel.simulation import EpochTimes, SimulatedExecutor
from lightning_fms.parallel.synthetic import SyntheticCurves

SPACE = {
    "model.lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
    "model.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "model.momentum": {"type": "float", "low": 0.0, "high": 0.95},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "data.batch_size": {"type": "categorical", "choices": [16, 32, 64, 128]},
}

#: (label, object path on the tuner, method, group): what the profile times. A label's time is its calls' own time,
#: without the timed calls they make (``decide`` is a claim's own work beyond the labels below it).
TIMED = (
    ("decide", "optimizer", "claim", "decide"),
    ("candidates", "optimizer", "candidates", "decide"),
    ("searcher state", "optimizer.searcher", "state_dict", "decide"),
    ("encode rows", "optimizer.searcher", "_encode", "decide"),
    ("fit and score", "optimizer.searcher", "select", "decide"),
    ("score with the current fit", "optimizer.searcher", "select_with_current_fit", "decide"),
    ("fit plan", "optimizer.searcher", "fit_plan", "decide"),
    ("background fit", "optimizer.searcher", "fit_surrogate", "background"),
    ("give back", "optimizer", "release", "commit"),
    ("commit", "ledger", "commit", "commit"),
    ("weight snapshot", "snapshots", "put", "commit"),
    ("state save", "ledger", "save", "state save"),
    ("state save: build", "optimizer", "state_dict", "state save"),
    ("state save: write", "study", "save_state", "state save"),
    ("reports", "ledger", "write_reports", "reports"),
)
GROUPS = ("decide", "commit", "state save", "reports")


def _attribute(root: object, path: str) -> object | None:
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


def build_tuner(args: argparse.Namespace, searcher: str, workers: int, study_dir: Path) -> tuple[FMSTuner, Any]:
    """The tuner over a simulated cluster of ``workers``, and its executor."""
    hub = None
    spec = dict(SPACE)
    if args.hub != "none":
        from lightning_fms.testing import tiny_hub
        from lightning_fms.zoo.build import default_cache_dir

        hub = tiny_hub(default_cache_dir() / "hubs" / "tiny") if args.hub == "tiny" else _hub(args.hub)
        spec = {"hub": {"type": "hub"}, **spec}
    space = SearchSpace.from_dict(spec, hub_entries=hub.names if hub is not None else None)
    executor = SimulatedExecutor(
        workers,
        SyntheticCurves(space, seed=args.seed),
        epoch_times=EpochTimes(args.median, args.spread),
        seed=args.seed,
        monitor="val_acc",
        cap=args.cap,
        modules=hub.build if hub is not None else None,
        hub_key=space.hub_key,
        mode=args.mode,
        refit=args.refit,
    )
    options: dict[str, Any] = {}
    if args.max_surrogate_rows is not None:
        options["max_surrogate_rows"] = None if args.max_surrogate_rows == 0 else args.max_surrogate_rows
    tuner = FMSTuner(
        space=space,
        study_dir=study_dir,
        budget=args.epochs,
        monitor="val_acc",
        mode="max",
        hub=hub,
        max_epochs_per_trial=args.cap,
        seed=args.seed,
        searcher=searcher,
        device="cpu",
        progress=False,
        executor=executor,
        **options,
    )
    return tuner, executor


def _hub(path: str) -> Any:
    from lightning_fms import ModelHub

    return ModelHub.from_yaml(path)


class _NoPosteriorCache:
    """Ablation: every decision with the current fit scores all its candidates again."""

    def posterior(self, surrogate: object, candidates: Sequence[Any], compute: Any) -> Any:
        return compute(list(range(len(candidates))))

    def clear(self) -> None:
        pass


def _ablate(args: argparse.Namespace, tuner: FMSTuner) -> None:
    """Switch off the remedies the flags name (instance attributes of this run's objects only)."""
    if args.report_interval is not None:
        tuner.ledger.report_interval_s = args.report_interval
    if args.no_group_commit:
        tuner.ledger.batch = lambda optimizer: contextlib.nullcontext()  # type: ignore[method-assign]
    if args.no_posterior_cache and hasattr(tuner.optimizer.searcher, "_posteriors"):
        tuner.optimizer.searcher._posteriors = _NoPosteriorCache()


def variant(args: argparse.Namespace) -> str:
    """The run's settings beside searcher and workers, as one label."""
    parts = [f"refit {args.refit}", f"reports {'driver' if args.report_interval is None else args.report_interval}"]
    parts += ["no group commit"] * args.no_group_commit + ["no posterior cache"] * args.no_posterior_cache
    return ", ".join(parts) + ("" if args.mode == "async" else f", {args.mode}")


def run_one(args: argparse.Namespace, searcher: str, workers: int) -> dict[str, Any]:
    """One simulated study; its measurements as a row of the table."""
    study_dir = Path(tempfile.mkdtemp(prefix=f"sim-{searcher}-{workers}-", dir=args.scratch))
    try:
        tuner, executor = build_tuner(args, searcher, workers, study_dir)
        _ablate(args, tuner)
        profile = DriverProfile()
        for label, path, method, _ in TIMED:
            target = _attribute(tuner, path)
            if target is not None:  # a claim that found nothing to claim takes time but is no decision
                profile.wrap(target, method, label, count=(lambda s: s is not None) if label == "decide" else None)
        started = time.perf_counter()
        tuner.run()
        executor.close()
        real_s = time.perf_counter() - started
        stats = executor.stats()
        decisions = tuner.optimizer.decisions
        trained = [(d["trial"], d["epoch"]) for d in decisions]
        assert tuner.optimizer.epochs_spent == args.epochs == len(trained) == len(set(trained)), "budget or twice"
        assert not executor.duplicates, executor.duplicates
        scored = [d for d in decisions if "acquisition" in d]
        groups = {g: 0.0 for g in GROUPS}
        for label, _, _, group in TIMED:
            if group in groups:
                groups[group] += profile.seconds[label]
        return {
            "searcher": searcher,
            "hub": args.hub,
            "variant": variant(args),
            "workers": workers,
            "epochs": stats.epochs,
            "trials": len(tuner.optimizer.trials),
            "best": tuner.optimizer.best().value,
            "makespan_s": stats.makespan_s,
            "utilisation": stats.utilisation,
            "ceiling": executor.ceiling(),
            "decisions_per_s": stats.decisions_per_s,
            "needed_per_s": workers / args.median,
            "mean_decision_s": profile.inclusive["decide"] / max(1, profile.calls["decide"]),
            "late_decision_s": _late_mean(profile, "decide"),
            "mean_commit_s": profile.inclusive["commit"] / max(1, profile.calls["commit"]),
            "late_commit_s": _late_mean(profile, "commit"),
            "state_saves": profile.calls["state save: write"],
            "mean_state_save_s": profile.mean("state save: write") + profile.mean("state save: build"),
            "late_state_save_s": _late_mean(profile, "state save: write") + _late_mean(profile, "state save: build"),
            "inline_fits": sum(1 for d in decisions if d.get("surrogate_s", 0.0) > 0 and "current_fit" not in d),
            "current_fit_decisions": sum(1 for d in decisions if "current_fit" in d),
            "zero_acquisition": sum(1 for d in scored if d["acquisition"] <= 0.0) / max(1, len(scored)),
            "background_fits": profile.background_calls["background fit"],
            "background_fit_s": profile.background["background fit"],
            "driver_s": stats.driver_s,
            "followed_s": stats.followed_s,
            "groups_s": {**groups, "other": stats.driver_s - sum(groups.values())},
            "split_s": {k: round(v, 3) for k, v in sorted(profile.seconds.items())},
            "calls": dict(sorted(profile.calls.items())),
            "real_s": real_s,
        }
    finally:
        if not args.keep:
            shutil.rmtree(study_dir, ignore_errors=True)


def _late_mean(profile: DriverProfile, label: str) -> float:
    """Mean seconds of ``label``'s calls (nested timed calls included) over the last quarter of them."""
    spans = [seconds for name, _, _, seconds in profile.events if name == label]
    late = spans[len(spans) - len(spans) // 4 :] if len(spans) >= 4 else spans
    return sum(late) / len(late) if late else 0.0


def shares(row: dict[str, Any]) -> str:
    """Where the driver's time went: its busy share of the makespan, then each group's share of the driver's time."""
    total = row["driver_s"] or 1.0
    parts = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in row["groups_s"].items())
    return f"busy {100 * row['driver_s'] / row['makespan_s']:.0f}%: {parts}"


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """The rows as a markdown table; capacity is epochs per second of the driver's own time."""
    print(
        "| searcher | variant | workers | epochs | makespan (s) | utilisation | ceiling | decisions/s (needed) "
        "| capacity (/s) "
        "| decision (s), mean / last quarter | commit (s) | state save (s), mean / last quarter (saves) "
        "| driver's time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['searcher']} | {r['variant']} | {r['workers']} | {r['epochs']} | {r['makespan_s']:.0f} "
            f"| {100 * r['utilisation']:.1f}% | {100 * r['ceiling']:.1f}% "
            f"| {r['decisions_per_s']:.2f} ({r['needed_per_s']:.2f}) | {r['epochs'] / r['driver_s']:.1f} "
            f"| {r['mean_decision_s']:.3f} / {r['late_decision_s']:.3f} | {r['mean_commit_s']:.3f} "
            f"| {r['mean_state_save_s']:.3f} / {r['late_state_save_s']:.3f} ({r['state_saves']}) | {shares(r)} |"
        )


def make_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--searchers", nargs="+", default=["fms", "dyhpo"])
    parser.add_argument("--epochs", type=int, default=3000, help="the study's budget in epochs")
    parser.add_argument("--cap", type=int, default=20, help="epochs per trial at most")
    parser.add_argument("--median", type=float, default=60.0, help="median epoch seconds")
    parser.add_argument("--spread", type=float, default=0.3, help="standard deviation of log epoch seconds")
    parser.add_argument("--hub", default="tiny", help="tiny (the default), none, or a hub.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refit", default="auto", help="the driver's refit policy: auto, background or inline")
    parser.add_argument("--mode", default="async", help="the driver's decision mode: async or sync")
    parser.add_argument(
        "--report_interval", type=float, default=None, help="seconds between report rewrites (default: the driver's)"
    )
    parser.add_argument("--no_group_commit", action="store_true", help="ablation: one state save per commit")
    parser.add_argument("--no_posterior_cache", action="store_true", help="ablation: score every candidate again")
    parser.add_argument("--max_surrogate_rows", type=int, default=None, help="0: no cap (default: the library's)")
    parser.add_argument("--json", type=Path, default=None, help="append each finished run here; skip runs in it")
    parser.add_argument("--scratch", default=None, help="where the study directories go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the study directories")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    done: list[dict[str, Any]] = []
    if args.json is not None and args.json.exists():
        done = [json.loads(line) for line in args.json.read_text().splitlines() if line.strip()]
    print(
        f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()} ({os.cpu_count()} cores, "
        f"{platform.machine()}), torch {torch.__version__} at {torch.get_num_threads()} thread(s), load "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    for searcher in args.searchers:
        for workers in args.workers:
            key = {"searcher": searcher, "hub": args.hub, "workers": workers, "variant": variant(args)}
            previous = [r for r in done if all(r.get(k) == v for k, v in key.items()) and r["epochs"] == args.epochs]
            if previous:
                rows.append(previous[-1])
                continue
            row = run_one(args, searcher, workers)
            row["finished"] = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
            row["load_after"] = os.getloadavg()[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json is not None:
                with args.json.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    print_table(rows)
    return 0 if all(math.isfinite(r["utilisation"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
