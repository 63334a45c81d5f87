"""The offline check: whether checkpoint weights tell more of a run's future than its learning curve does.

From a pool (every configuration trained to the end, weights stored after every epoch), each configuration's
final validation value (epoch ``E``) is predicted from what is known after epoch ``t``: the hyperparameters and
the curve ``y_1 .. y_t``, with and without the ``"summary"`` weight features of ``W_t`` (and of ``W_t - W_0``,
:class:`~lightning_fms.weights.summary.SummaryFeaturizer`). The regressor is scikit-learn's
``HistGradientBoostingRegressor`` with a fixed seed. Two protocols:

* **within task**: 5-fold cross-validation over the pool's configurations; the hyperparameters are the
  space's unit-cube encoding, hub entry one-hot included;
* **leave one task out**: train on the other pools, test on the held-out one. The hub one-hot names entries of
  one task only, so it is left out: the features are the non-hub hyperparameters (encoded by each task's space,
  shared by name), the curve and (with weights) the weight features. Curves and targets are standardised per
  task by the mean and standard deviation of the curve entries known at ``t`` (no value after ``t`` is used).

Scores are Kendall's tau and R^2 between predicted and actual final values, per task and ``t``. The command line::

    python -m lightning_fms.bench.offline TASK.yaml [TASK.yaml ...] [--out results.csv] [--epochs 1 2 4]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_fms.bench.pool import Pool, load_pool
from lightning_fms.bench.task import BenchTask
from lightning_fms.errors import FMSError, error_line
from lightning_fms.extras import import_optional
from lightning_fms.threads import torch_threads
from lightning_fms.weights.summary import SummaryFeaturizer

__all__ = ["EPOCHS_SEEN", "OfflineReport", "TaskData", "main", "offline_check", "task_data"]

#: The epochs ``t`` after which the final value is predicted, by default.
EPOCHS_SEEN: tuple[int, ...] = (1, 2, 4)
WITHIN = "within-task"
ACROSS = "leave-one-task-out"
WITHOUT_WEIGHTS = "hp+curve"
WITH_WEIGHTS = "hp+curve+weights"
LAST_VALUE = "y_t"


@dataclass
class TaskData:
    """What the offline check reads from one pool (configurations with a complete curve only).

    Attributes:
        name: The task's name.
        hp: Hyperparameters as the space encodes them (hub one-hot included), shape ``[N, D]``.
        shared_hp: The non-hub hyperparameters, shape ``[N, D']``, columns named by :attr:`shared_names`.
        shared_names: One name per column of :attr:`shared_hp` (``"param"`` or ``"param[k]"``).
        curves: Validation values after epochs ``1 .. E``, shape ``[N, E]``.
        weights: ``t -> [N, 20]`` summary features of ``W_t`` against the run's ``W_0``.
        dropped: Configurations left out because their curve is incomplete (failed runs).
        seconds: Time spent loading modules and computing weight features.
    """

    name: str
    hp: np.ndarray
    shared_hp: np.ndarray
    shared_names: list[str]
    curves: np.ndarray
    weights: dict[int, np.ndarray]
    dropped: int = 0
    seconds: float = 0.0

    @property
    def final(self) -> np.ndarray:
        """The final validation value of each configuration, shape ``[N]``."""
        return self.curves[:, -1]


def task_data(pool: Pool, epochs_seen: Sequence[int]) -> TaskData:
    """Read a pool once: encodings, curves and the weight features after each epoch in ``epochs_seen``.

    Each ``W_t`` is loaded once (``pool.load_module(i, t)``) and each hub entry's pretrained module once; the
    features are computed in float64 on one CPU thread.

    Args:
        pool: The pool.
        epochs_seen: The epochs ``t`` (each in ``1 .. E - 1``).
    """
    start = time.perf_counter()
    keep = np.flatnonzero(np.isfinite(pool.val).all(axis=1))
    configs = [pool.configs[i] for i in keep]
    space = pool.space
    hub_key = space.hub_key
    shared_names: list[str] = []
    shared_columns: list[list[float]] = [[] for _ in configs]
    for name in space:
        if name == hub_key:
            continue
        param = space[name]
        width = param.dim
        shared_names.extend([name] if width == 1 else [f"{name}[{k}]" for k in range(width)])
        for row, config in zip(shared_columns, configs):
            row.extend(param.encode(config[name]))
    featurizer = SummaryFeaturizer()
    hub_modules: dict[str, nn.Module] = {}
    weights: dict[int, np.ndarray] = {}
    with torch_threads(1), torch.no_grad():
        for t in epochs_seen:
            rows = []
            for i, config in zip(keep, configs):
                entry = str(config[hub_key]) if hub_key else ""
                if entry not in hub_modules:
                    hub_modules[entry] = pool.load_hub_module(entry) if hub_key else pool.load_module(int(i), 0)
                rows.append(featurizer.features(pool.load_module(int(i), t), hub_modules[entry]).numpy())
            weights[t] = np.stack(rows) if rows else np.zeros((0, featurizer.embedding_dim))
    return TaskData(
        name=pool.name,
        hp=space.encode_many(configs).numpy(),
        shared_hp=np.asarray(shared_columns, dtype=np.float64).reshape(len(configs), len(shared_names)),
        shared_names=shared_names,
        curves=np.asarray(pool.val, dtype=np.float64)[keep],
        weights=weights,
        dropped=int(pool.size - len(keep)),
        seconds=time.perf_counter() - start,
    )


@dataclass
class OfflineReport:
    """The scores of the offline check.

    Attributes:
        rows: One dict per (protocol, task, t, features): ``protocol``, ``task``, ``t``, ``features``, ``n``,
            ``kendall_tau``, ``r2`` (``nan`` where it does not apply).
        seconds: ``{"weights": ..., "models": ..., "total": ...}``.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def value(self, protocol: str, task: str, t: int, features: str, metric: str) -> float:
        """One score (``nan`` if absent)."""
        for row in self.rows:
            if (row["protocol"], row["task"], row["t"], row["features"]) == (protocol, task, t, features):
                return float(row[metric])
        return math.nan

    def to_markdown(self) -> str:
        """One table per protocol: per task and ``t``, tau and R^2 without and with the weight features."""
        out = []
        for protocol in (WITHIN, ACROSS):
            keys = sorted(
                {(r["task"], r["t"]) for r in self.rows if r["protocol"] == protocol},
                key=lambda k: (self._task_order(k[0]), k[1]),
            )
            if not keys:
                continue
            hp = "hp" if protocol == WITHIN else "hp without hub"
            out.append(f"**{protocol}** (features: {hp}, curve y_1..y_t, optionally the 20 summary weight features)")
            out.append("")
            out.append("| task | t | n | tau(y_t) | tau no weights | tau weights | R² no weights | R² weights |")
            out.append("|---|---|---|---|---|---|---|---|")
            for task, t in keys:
                cells = [
                    self.value(protocol, task, t, LAST_VALUE, "kendall_tau"),
                    self.value(protocol, task, t, WITHOUT_WEIGHTS, "kendall_tau"),
                    self.value(protocol, task, t, WITH_WEIGHTS, "kendall_tau"),
                    self.value(protocol, task, t, WITHOUT_WEIGHTS, "r2"),
                    self.value(protocol, task, t, WITH_WEIGHTS, "r2"),
                ]
                n = next(r["n"] for r in self.rows if (r["protocol"], r["task"], r["t"]) == (protocol, task, t))
                out.append(f"| {task} | {t} | {n} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
            out.append("")
        return "\n".join(out)

    def _task_order(self, task: str) -> int:
        names = list(dict.fromkeys(r["task"] for r in self.rows))
        return names.index(task)

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """Write :attr:`rows` as CSV (one line per row, a header first)."""
        columns = ["protocol", "task", "t", "features", "n", "kendall_tau", "r2"]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)


def _scores(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """Kendall's tau (tau-b) and R^2 of predictions, shape ``[N]`` each."""
    stats = import_optional("scipy.stats", "bench", "the offline check")
    metrics = import_optional("sklearn.metrics", "demo", "the offline check", package="scikit-learn")
    tau = float(stats.kendalltau(predicted, actual).statistic) if len(actual) > 1 else math.nan
    return tau, float(metrics.r2_score(actual, predicted)) if len(actual) > 1 else math.nan


def _regressor(seed: int) -> Any:
    ensemble = import_optional("sklearn.ensemble", "demo", "the offline check", package="scikit-learn")
    return ensemble.HistGradientBoostingRegressor(random_state=seed)


def _within_features(data: TaskData, t: int, weights: bool) -> np.ndarray:
    parts = [data.hp, data.curves[:, :t]]
    if weights:
        parts.append(data.weights[t])
    return np.concatenate(parts, axis=1)


def within_task(data: TaskData, t: int, folds: int, seed: int) -> list[dict[str, Any]]:
    """Out-of-fold predictions of the final value after epoch ``t`` (``folds``-fold CV), scored.

    Returns:
        Three rows (features ``y_t``, ``hp+curve``, ``hp+curve+weights``) as in :attr:`OfflineReport.rows`.
    """
    model_selection = import_optional("sklearn.model_selection", "demo", "the offline check", package="scikit-learn")
    n = len(data.final)
    if n < folds:
        raise FMSError(f"task {data.name!r} has {n} complete configurations, fewer than {folds} folds")
    split = model_selection.KFold(n_splits=folds, shuffle=True, random_state=seed)
    base = {"protocol": WITHIN, "task": data.name, "t": t, "n": n}
    tau_last, _ = _scores(data.curves[:, t - 1], data.final)
    rows = [{**base, "features": LAST_VALUE, "kendall_tau": tau_last, "r2": math.nan}]
    for weights, name in ((False, WITHOUT_WEIGHTS), (True, WITH_WEIGHTS)):
        x = _within_features(data, t, weights)
        predicted = np.zeros(n)
        for train, test in split.split(x):
            model = _regressor(seed).fit(x[train], data.final[train])
            predicted[test] = model.predict(x[test])
        tau, r2 = _scores(predicted, data.final)
        rows.append({**base, "features": name, "kendall_tau": tau, "r2": r2})
    return rows


def _standardised(data: TaskData, t: int) -> tuple[np.ndarray, np.ndarray]:
    """The curve ``[N, t]`` and final values ``[N]`` in units of the curve entries known after ``t``."""
    known = data.curves[:, :t]
    scale = float(known.std()) or 1.0
    mean = float(known.mean())
    return (known - mean) / scale, (data.final - mean) / scale


def leave_one_task_out(tasks: Sequence[TaskData], t: int, seed: int) -> list[dict[str, Any]]:
    """Train on all tasks but one and score the held-out one, for each task in turn, after epoch ``t``.

    Raises:
        FMSError: If the tasks' non-hub hyperparameters differ.
    """
    names = tasks[0].shared_names
    for data in tasks[1:]:
        if data.shared_names != names:
            raise FMSError(
                f"leave-one-task-out needs the same hyperparameters in every task: {data.name!r} has "
                f"{data.shared_names}, {tasks[0].name!r} has {names}"
            )
    inputs: dict[bool, list[np.ndarray]] = {False: [], True: []}
    targets = []
    for data in tasks:
        curve, final = _standardised(data, t)
        inputs[False].append(np.concatenate([data.shared_hp, curve], axis=1))
        inputs[True].append(np.concatenate([data.shared_hp, curve, data.weights[t]], axis=1))
        targets.append(final)
    rows = []
    for held, data in enumerate(tasks):
        base = {"protocol": ACROSS, "task": data.name, "t": t, "n": len(targets[held])}
        tau_last, _ = _scores(data.curves[:, t - 1], data.final)
        rows.append({**base, "features": LAST_VALUE, "kendall_tau": tau_last, "r2": math.nan})
        others = [k for k in range(len(tasks)) if k != held]
        y = np.concatenate([targets[k] for k in others])
        for weights, name in ((False, WITHOUT_WEIGHTS), (True, WITH_WEIGHTS)):
            x = np.concatenate([inputs[weights][k] for k in others])
            model = _regressor(seed).fit(x, y)
            tau, r2 = _scores(model.predict(inputs[weights][held]), targets[held])
            rows.append({**base, "features": name, "kendall_tau": tau, "r2": r2})
    return rows


def offline_check(
    pools: Sequence[Pool],
    epochs_seen: Sequence[int] = EPOCHS_SEEN,
    folds: int = 5,
    seed: int = 0,
) -> OfflineReport:
    """Run both protocols on ``pools`` (leave-one-task-out only with two pools or more).

    Args:
        pools: The pools.
        epochs_seen: The epochs ``t`` after which the final value is predicted; those not below a pool's ``E``
            are skipped for that pool (and for leave-one-task-out, unless every pool has them).
        folds: Folds of the within-task cross-validation.
        seed: Seed of the folds and of the regressor.

    Raises:
        FMSError: A ``t`` below 1, a task with fewer complete configurations than folds, or tasks whose
            hyperparameters differ (leave-one-task-out).
    """
    if any(int(t) < 1 for t in epochs_seen):
        raise FMSError(f"epochs must be at least 1, got {list(epochs_seen)}")
    start = time.perf_counter()
    tasks = [task_data(pool, [t for t in epochs_seen if t < pool.epochs]) for pool in pools]
    weight_seconds = time.perf_counter() - start
    report = OfflineReport()
    threadpoolctl = import_optional("threadpoolctl", "demo", "the offline check")
    with threadpoolctl.threadpool_limits(1):
        for data in tasks:
            for t in data.weights:
                report.rows.extend(within_task(data, t, folds, seed))
        if len(tasks) > 1:
            for t in epochs_seen:
                if all(t in data.weights for data in tasks):
                    report.rows.extend(leave_one_task_out(tasks, t, seed))
    total = time.perf_counter() - start
    report.seconds = {"weights": weight_seconds, "models": total - weight_seconds, "total": total}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_fms.bench.offline TASK.yaml [...] [--out CSV] [--epochs T ...] [--folds K]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_fms.bench.offline",
        description="Predict each pool configuration's final validation value from the first epochs, with and "
        "without weight features.",
    )
    parser.add_argument("tasks", nargs="+", help="task files whose pools are built")
    parser.add_argument("--out", default=None, help="write the scores as CSV here")
    parser.add_argument("--epochs", type=int, nargs="+", default=list(EPOCHS_SEEN), help="epochs t seen (1 2 4)")
    parser.add_argument("--folds", type=int, default=5, help="folds of the within-task cross-validation (5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of folds and regressor (0)")
    parser.add_argument("--cache_dir", default=None, help="cache root (default $LIGHTNING_FMS_CACHE or ~/.cache)")
    args = parser.parse_args(argv)
    try:
        pools = [load_pool(BenchTask.from_file(path), cache_dir=args.cache_dir, build=False) for path in args.tasks]
        report = offline_check(pools, args.epochs, folds=args.folds, seed=args.seed)
    except FMSError as error:
        print(error_line(error), file=sys.stderr)
        return 2
    print(report.to_markdown())
    seconds = report.seconds
    print(
        f"{len(pools)} pools in {seconds['total']:.1f}s (weight features {seconds['weights']:.1f}s, "
        f"models {seconds['models']:.1f}s)"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report.write_csv(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
