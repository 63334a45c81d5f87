"""Study outputs: ``results.json``, ``trajectory.csv`` and ``regret.png``, each written atomically."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lightning_fms.atomic import atomic_write_bytes, atomic_write_text
from lightning_fms.errors import FMSError
from lightning_fms.extras import import_optional
from lightning_fms.search.trial import to_score

if TYPE_CHECKING:
    from lightning_fms.search.optimizer import FreezeThawOptimizer
    from lightning_fms.search.space import SearchSpace
    from lightning_fms.search.trial import Trial

log = logging.getLogger(__name__)

TRAJECTORY_COLUMNS = (
    "epochs_spent",
    "budget_spent",
    "decision",
    "trial",
    "epoch",
    "kind",
    "hub_entry",
    "family",
    "value",
    "best_so_far",
    "wall_s",
    "surrogate_s",
    "trainable_fraction",
    "worker",
)


class DecisionLog(Protocol):
    """What a trajectory is read from: a ``FreezeThawOptimizer`` or a :class:`~lightning_fms.study.view.StudyView`.

    Attributes:
        space: The search space.
        mode: ``"max"`` or ``"min"``.
        trials: Every trial by id.
        decisions: The decision log, one entry per trained epoch.
    """

    space: SearchSpace
    mode: str
    trials: Mapping[int, Trial]
    decisions: Sequence[Mapping[str, Any]]


def trajectory_rows(study: DecisionLog, families: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per trained epoch, in the order they were trained, with the best value so far."""
    rows = []
    best = math.nan
    hub_key = study.space.hub_key
    for decision in study.decisions:
        value = float(decision["value"])
        if math.isfinite(value) and (
            not math.isfinite(best) or to_score(value, study.mode) > to_score(best, study.mode)
        ):
            best = value
        config = study.trials[decision["trial"]].config
        entry = str(config.get(hub_key, "")) if hub_key else ""
        rows.append(
            {
                "epochs_spent": decision["epochs_spent"],
                "budget_spent": round(float(decision.get("budget_spent", decision["epochs_spent"])), 6),
                "decision": decision["decision"],
                "trial": decision["trial"],
                "epoch": decision["epoch"],
                "kind": decision["kind"],
                "hub_entry": entry,
                "family": families.get(entry, ""),
                "value": value,
                "best_so_far": best,
                "wall_s": round(float(decision.get("wall_s", 0.0)), 4),
                "surrogate_s": round(float(decision.get("surrogate_s", 0.0)), 4),
                "trainable_fraction": float(decision.get("trainable_fraction", 1.0)),
                "worker": str(decision.get("worker", "")),
            }
        )
    return rows


def write_trajectory(path: Path, optimizer: FreezeThawOptimizer, families: Mapping[str, str]) -> None:
    """Write ``trajectory.csv`` (columns :data:`TRAJECTORY_COLUMNS`)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TRAJECTORY_COLUMNS)
    writer.writeheader()
    writer.writerows(trajectory_rows(optimizer, families))
    atomic_write_text(path, buffer.getvalue())


def write_results(
    path: Path,
    optimizer: FreezeThawOptimizer,
    best_checkpoint: Path | None,
    monitor: str,
    families: Mapping[str, str],
) -> dict[str, Any]:
    """Write ``results.json``: the best trial, epochs spent, time split, per-family epochs, per-trial summary."""
    hub_key = optimizer.space.hub_key
    best = optimizer.best()
    best_block = None
    if best is not None:
        config = optimizer.trials[best.trial_id].config
        best_block = {
            "trial": best.trial_id,
            "epoch": best.epoch,
            "hub_entry": config.get(hub_key) if hub_key else None,
            "hyperparameters": {k: v for k, v in config.items() if k != hub_key},
            "value": best.value,
            "checkpoint": str(best_checkpoint) if best_checkpoint is not None else None,
        }
    epochs_by_family: dict[str, int] = {}
    epochs_by_entry: dict[str, int] = {}
    for decision in optimizer.decisions:
        entry = str(optimizer.trials[decision["trial"]].config.get(hub_key, "")) if hub_key else ""
        epochs_by_entry[entry] = epochs_by_entry.get(entry, 0) + 1
        family = families.get(entry, entry)
        epochs_by_family[family] = epochs_by_family.get(family, 0) + 1
    trials = []
    for trial in optimizer.trials.values():
        scores = [to_score(v, optimizer.mode) for v in trial.values]
        best_index = max(range(len(scores)), key=scores.__getitem__) if scores else None
        trials.append(
            {
                "id": trial.id,
                "hub_entry": trial.config.get(hub_key) if hub_key else None,
                "config": trial.config,
                "status": trial.status.value,
                "epochs": trial.epochs,
                "best_value": trial.values[best_index] if best_index is not None else None,
                "last_value": trial.values[-1] if trial.values else None,
                "error": trial.error,
            }
        )
    results = {
        "monitor": monitor,
        "mode": optimizer.mode,
        "seed": optimizer.seed,
        "budget": optimizer.budget,
        "epochs_spent": optimizer.epochs_spent,
        "budget_spent": round(optimizer.budget_spent, 6),
        "max_epochs_per_trial": optimizer.cap,
        "best": best_block,
        "time": {
            "training_s": round(sum(d.get("wall_s", 0.0) for d in optimizer.decisions), 3),
            "surrogate_s": round(sum(d.get("surrogate_s", 0.0) for d in optimizer.decisions), 3),
        },
        "epochs_by_family": epochs_by_family,
        "epochs_by_hub_entry": epochs_by_entry,
        "trials": trials,
    }
    atomic_write_text(path, json.dumps(results, indent=2, default=str))
    return results


def write_regret_plot(path: Path, optimizer: FreezeThawOptimizer, monitor: str) -> None:
    """Write ``regret.png``: best value so far, and its regret to the best value the study found, per epoch spent.

    Without matplotlib (the ``plots`` extra) the plot is skipped with one warning; the study is unaffected.
    """
    try:
        matplotlib = import_optional("matplotlib", "plots", "regret.png")
    except FMSError as error:
        log.warning("%s; skipping it", error)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = trajectory_rows(optimizer, {})
    xs = [r["epochs_spent"] for r in rows if math.isfinite(r["best_so_far"])]
    best_so_far = [r["best_so_far"] for r in rows if math.isfinite(r["best_so_far"])]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    if xs:
        final = best_so_far[-1]
        regret = [abs(final - v) for v in best_so_far]
        top.step(xs, best_so_far, where="post", color="tab:blue")
        floor = min([r for r in regret if r > 0], default=1e-6) / 10
        bottom.step(xs, [max(r, floor) for r in regret], where="post", color="tab:red")
        bottom.set_yscale("log")
    top.set_ylabel(f"best {monitor} so far")
    bottom.set_ylabel("regret to best found")
    bottom.set_xlabel("epochs spent")
    top.set_title(f"FMS study: {optimizer.epochs_spent} epochs, {len(optimizer.trials)} trials")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
