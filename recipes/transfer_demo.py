"""A prior from a user's own earlier studies: digits studies first, then the demo hub on MNIST with and without it.

Runs, in order (each a plain ``lightning-fms`` command, printed before it runs; finished studies are resumed, so a
rerun skips what is done)::

    lightning-fms tune --config recipes/demo.yaml --study_dir OUT/digits-0 --seed 0            (and seed 1)
    lightning-fms pretrain --from OUT/digits-0 OUT/digits-1 --out OUT/p.st
    lightning-fms tune --config recipes/demo_mnist.yaml --study_dir OUT/mnist-0 --seed 0       (seeds 0 .. N-1)
    lightning-fms tune --config recipes/demo_mnist.yaml --study_dir OUT/mnist-prior-0 --seed 0 --prior OUT/p.st

and prints, per seed, the best validation value without the prior after the budget, and how many epochs each
study needed to reach it (``-`` if it never did): ``python recipes/transfer_demo.py --out runs/transfer-demo``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "lightning_fms.cli"]


def run(arguments: list[str]) -> None:
    """Run one ``lightning-fms`` command, echoing it."""
    print("$ lightning-fms " + " ".join(shlex.quote(a) for a in arguments), flush=True)
    subprocess.run([*CLI, *arguments], check=True)


def curve(study: Path) -> list[tuple[int, float]]:
    """``(epochs spent, best value so far)`` after every decision of a finished study (mode max)."""
    decisions = json.loads((study / "study.json").read_text())["decisions"]
    best, out = float("-inf"), []
    for d in decisions:
        if d.get("value") is not None:
            best = max(best, float(d["value"]))
        out.append((int(d["epochs_spent"]), best))
    return out


def epochs_to_reach(points: list[tuple[int, float]], target: float) -> int | None:
    """The first epochs-spent count at which the best value is at least ``target``."""
    return next((spent for spent, best in points if best >= target - 1e-12), None)


def main() -> None:
    """Run the studies and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/transfer-demo")
    parser.add_argument("--seeds", type=int, default=3, help="MNIST studies per arm")
    parser.add_argument("--budget", type=int, default=100)
    args = parser.parse_args()
    out = Path(args.out)
    quiet = ["--no-progress"]
    for seed in (0, 1):
        run(["tune", "--config", "recipes/demo.yaml", "--study_dir", str(out / f"digits-{seed}"), "--seed", str(seed),
             "--budget", str(args.budget), *quiet])  # fmt: skip
    prior = out / "digits-prior.safetensors"
    if not prior.exists():
        run(["pretrain", "--from", str(out / "digits-0"), str(out / "digits-1"), "--out", str(prior), "--no-progress"])
    rows = []
    for seed in range(args.seeds):
        plain, transferred = out / f"mnist-{seed}", out / f"mnist-prior-{seed}"
        common = ["tune", "--config", "recipes/demo_mnist.yaml", "--seed", str(seed), "--budget", str(args.budget)]
        run([*common, "--study_dir", str(plain), *quiet])
        run([*common, "--study_dir", str(transferred), "--prior", str(prior), *quiet])
        a, b = curve(plain), curve(transferred)
        target = a[-1][1]
        rows.append((seed, target, epochs_to_reach(a, target), b[-1][1], epochs_to_reach(b, target)))
    print("\n| seed | best without prior @budget | epochs to reach it: without | with prior | best with prior |")
    print("|---|---|---|---|---|")
    for seed, target, without, best_with, with_prior in rows:
        print(
            f"| {seed} | {target:.4f} | {without} | {with_prior if with_prior is not None else '-'} | {best_with:.4f} |"
        )


if __name__ == "__main__":
    main()
