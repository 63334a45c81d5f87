"""Earlier tasks, read once: benchmark pools and finished study directories as per-task rows.

A source is one of

* a benchmark task file (:class:`~lightning_fms.bench.task.BenchTask`): its pool is read from the cache (never
  built here);
* a pool folder (``pool.json`` and ``task.json``): the task is rebuilt from the task file ``task.json`` names;
* a study directory written by ``lightning-fms tune`` (``state.pt``, read with ``weights_only=True``, or
  ``study.json``).

:func:`read_source` reads one into a :class:`SourceTask`: the space, every configuration's monitored values after
epochs ``1 .. E`` and (``weights=True``) the summary features of its weights after epochs ``0 .. E-1``
(:mod:`~lightning_fms.transfer.source_features`, cached per source). :func:`task_rows` lays a source out as the
rows a study's surrogate sees (the alignment of :mod:`lightning_fms.search.rows`): the row that predicts epoch
``k`` sees the configuration, the budget ``k / E``, the scores of epochs ``1 .. k-1`` and the weights after epoch
``k-1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_fms.bench.pool import Pool, load_pool
from lightning_fms.bench.pool_data import POOL_FILE, TASK_FILE, pool_from_data, read_pool_file
from lightning_fms.bench.task import BenchTask
from lightning_fms.errors import FMSError, one_line
from lightning_fms.hub import ModelHub
from lightning_fms.search.space import HubChoice, SearchSpace
from lightning_fms.study.directory import StudyDirectory
from lightning_fms.study.snapshots import WeightSnapshots
from lightning_fms.transfer.columns import encoded_column_names
from lightning_fms.transfer.source_features import (
    FEATURE_DIM,
    cached_features,
    pool_features,
    study_features,
    tensors_sha256,
)

__all__ = ["SourceTask", "TaskRows", "read_source", "read_sources", "task_rows"]

#: What a source may be (for messages).
EXPECTED = (
    "a benchmark task file (.yaml), a pool folder (pool.json and task.json) or a study directory written by "
    "lightning-fms tune (state.pt)"
)
STUDY_JSON = "study.json"


@dataclass
class SourceTask:
    """One earlier task, read once.

    Attributes:
        name: The pool's task name, or the study directory's name.
        origin: ``"pool"`` or ``"study"``.
        fingerprint: Hex SHA-256 identifying exactly the data read (a pool's from ``pool.json``; a study's of its
            settings, its trials and its hub entries' pretrained weights).
        path: What was given (for messages).
        space: The task's space (the hub choice included, with its entries).
        mode: ``"max"`` or ``"min"``.
        cap: ``E``, the per-trial epoch cap.
        configs: ``N`` configurations.
        values: ``[N, E]`` float64 raw monitored values after epochs ``1 .. E``, ``NaN`` where not observed.
        weight_features: ``[N, E, 20]`` float64: ``[i, k]`` are the summary features of configuration ``i``'s
            weights after epoch ``k`` against its ``W_0`` (``k = 0``: the hub entry's pretrained weights, change
            part zero); ``NaN`` where that checkpoint does not exist; ``None`` when read with ``weights=False``.
        hub_entry_ids: Hub entry name -> hex SHA-256 of its pretrained weights (``""`` if unknown): the weights
            file's, as the hub records it (for a study, as recorded with its snapshot; else a SHA-256 of the
            snapshot's tensors, :func:`~lightning_fms.transfer.source_features.tensors_sha256`).
    """

    name: str
    origin: str
    fingerprint: str
    path: str
    space: SearchSpace
    mode: str
    cap: int
    configs: list[dict[str, Any]]
    values: np.ndarray
    weight_features: np.ndarray | None
    hub_entry_ids: dict[str, str]

    def scores(self) -> np.ndarray:
        """``[N, E]`` values as scores (larger is better: negated for ``"min"``), ``NaN`` where not observed."""
        return self.values.copy() if self.mode == "max" else -self.values

    @property
    def size(self) -> int:
        """``N``, the number of configurations."""
        return len(self.configs)


@dataclass
class TaskRows:
    """Every observed (configuration ``i``, epoch ``k``) of one source as a study's surrogate sees it.

    The row that predicts epoch ``k`` sees the configuration, the budget ``k / E``, the curve before ``k`` and the
    weights after epoch ``k - 1``. Rows are ordered by configuration, then epoch.

    Attributes:
        task: The source's name.
        column_names: :func:`~lightning_fms.transfer.columns.encoded_column_names` of the space, one per column
            of :attr:`x`.
        x: ``[R, D]`` float64, ``space.encode`` of the configuration.
        budget: ``[R]`` float64, ``k / E``.
        curves: ``[R, E]`` float64 scores ``y_1 .. y_{k-1}``, left aligned, zero padded.
        curve_lengths: ``[R]`` long, ``k - 1``.
        weights: ``[R, 20]`` float64 features of ``W_{k-1}`` (``None`` without weight features).
        targets: ``[R]`` float64 score at epoch ``k``.
        config_index: ``[R]`` long, ``i``.
        epoch: ``[R]`` long, ``k``.
        final: ``[R]`` float64 score at the configuration's last observed epoch.
        final_epoch: ``[R]`` long, that epoch.
    """

    task: str
    column_names: list[str]
    x: Tensor
    budget: Tensor
    curves: Tensor
    curve_lengths: Tensor
    weights: Tensor | None
    targets: Tensor
    config_index: Tensor
    epoch: Tensor
    final: Tensor
    final_epoch: Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def task_rows(source: SourceTask) -> TaskRows:
    """The rows of every observed epoch of ``source``.

    A configuration's epochs count up to its first non-finite value (a failed configuration contributes its
    epochs before the failure). With weight features, rows whose ``W_{k-1}`` is unknown are dropped.

    Returns:
        ``R`` rows in configuration order, then epoch order.
    """
    scores = source.scores()
    n, cap = scores.shape
    features = source.weight_features
    observed = np.zeros(n, dtype=np.int64)
    for i in range(n):
        finite = np.isfinite(scores[i])
        observed[i] = cap if finite.all() else int(np.argmin(finite))
    index, epoch = [], []
    for i in range(n):
        for k in range(1, int(observed[i]) + 1):
            if features is not None and not np.isfinite(features[i, k - 1]).all():
                continue
            index.append(i)
            epoch.append(k)
    rows_i = np.asarray(index, dtype=np.int64)
    rows_k = np.asarray(epoch, dtype=np.int64)
    curves = np.zeros((len(rows_i), cap))
    for r, (i, k) in enumerate(zip(rows_i, rows_k)):
        curves[r, : k - 1] = scores[i, : k - 1]
    encoded = source.space.encode_many(source.configs).numpy()
    final_epoch = observed[rows_i]
    return TaskRows(
        task=source.name,
        column_names=encoded_column_names(source.space),
        x=torch.from_numpy(encoded[rows_i].reshape(len(rows_i), source.space.dim)),
        budget=torch.from_numpy(rows_k / cap).double(),
        curves=torch.from_numpy(curves),
        curve_lengths=torch.from_numpy(rows_k - 1),
        weights=torch.from_numpy(features[rows_i, rows_k - 1].reshape(len(rows_i), FEATURE_DIM))
        if features is not None
        else None,
        targets=torch.from_numpy(scores[rows_i, rows_k - 1].copy()),
        config_index=torch.from_numpy(rows_i),
        epoch=torch.from_numpy(rows_k),
        final=torch.from_numpy(scores[rows_i, final_epoch - 1].copy()),
        final_epoch=torch.from_numpy(final_epoch),
    )


# ------------------------------------------------------------------ reading
@dataclass
class _Opened:
    """A source with everything but its weight features, and how to compute them (or why they cannot be)."""

    task: SourceTask
    features: Callable[[], np.ndarray] | None
    no_weights: str | None = None


def read_source(
    path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None, weights: bool = True
) -> SourceTask:
    """Read one earlier task.

    Args:
        path: A benchmark task file, a pool folder or a study directory.
        cache_dir: The cache root: where pools are looked up and weight features are cached (default
            :func:`~lightning_fms.zoo.build.default_cache_dir`).
        weights: Also read the weight features (computed once per source, then read from the cache).

    Raises:
        FMSError: the path is none of the above, the pool is not built, the study recorded no weights (with
            ``weights=True``), or a file is unreadable; always one line.
    """
    return _finish(_open(path, cache_dir), cache_dir, weights)


def read_sources(
    paths: Sequence[str | os.PathLike[str]],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    weights: bool = True,
    progress: bool = False,
) -> list[SourceTask]:
    """Read several earlier tasks (see :func:`read_source`), in order.

    Every source is opened, and checked to be a task of its own, before any weight feature is computed.

    Args:
        paths: The sources.
        cache_dir: The cache root.
        weights: Also read the weight features.
        progress: Print one line per source to stderr.

    Raises:
        FMSError: a source cannot be read, or two sources are the same task (one fingerprint).
    """
    opened = []
    seen: dict[str, str] = {}
    for path in paths:
        source = _open(path, cache_dir)
        fingerprint = source.task.fingerprint
        if fingerprint in seen:
            raise FMSError(
                f"sources {seen[fingerprint]} and {path} are the same task (fingerprint {fingerprint[:12]}); "
                "give each task once"
            )
        seen[fingerprint] = str(path)
        opened.append(source)
    tasks = []
    for source in opened:
        task, seconds = _finish_timed(source, cache_dir, weights)
        if progress:
            how = (
                ""
                if not weights
                else " (weight features cached)"
                if seconds is None
                else (f" (weight features computed in {seconds:.1f}s)")
            )
            print(f"{task.name} ({task.origin}): {task.size} configurations x {task.cap} epochs{how}", file=sys.stderr)
        tasks.append(task)
    return tasks


def _finish(source: _Opened, cache_dir: str | os.PathLike[str] | None, weights: bool) -> SourceTask:
    return _finish_timed(source, cache_dir, weights)[0]


def _finish_timed(
    source: _Opened, cache_dir: str | os.PathLike[str] | None, weights: bool
) -> tuple[SourceTask, float | None]:
    task = source.task
    if not weights:
        return task, None
    if source.no_weights is not None or source.features is None:
        raise FMSError(source.no_weights or f"{task.path} has no weights")
    task.weight_features, seconds = cached_features(task.fingerprint, (task.size, task.cap), source.features, cache_dir)
    return task, seconds


def _open(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None) -> _Opened:
    given = Path(path).expanduser()
    if not given.exists():
        raise FMSError(f"source {path} does not exist (expected {EXPECTED})")
    if given.is_file():
        if given.suffix.lower() not in (".yaml", ".yml"):
            raise FMSError(f"source {path} is a file but not a benchmark task file (expected {EXPECTED})")
        task = BenchTask.from_file(given)
        return _open_pool(load_pool(task, cache_dir, build=False), task, str(path))
    if (given / POOL_FILE).is_file() and (given / TASK_FILE).is_file():
        return _open_pool_folder(given, str(path))
    if (given / StudyDirectory.STATE_FILE).is_file() or (given / STUDY_JSON).is_file():
        return _open_study(given, str(path))
    raise FMSError(f"source {path} is a folder but neither a pool folder nor a study directory (expected {EXPECTED})")


# ------------------------------------------------------------------ pools
def _open_pool(pool: Pool, task: BenchTask, path: str, hub: ModelHub | None = None) -> _Opened:
    hub = hub if hub is not None else task.load_hub()
    choices = _hub_entries(pool.space)
    ids = {entry: (hub.entry(entry).sha256 or "") if entry in hub.names else "" for entry in choices}
    values = np.asarray(pool.val, dtype=np.float64)
    source = SourceTask(
        name=pool.name,
        origin="pool",
        fingerprint=task.fingerprint(),
        path=path,
        space=pool.space,
        mode=_mode(pool.mode, path),
        cap=pool.epochs,
        configs=[dict(c) for c in pool.configs],
        values=values.reshape(pool.size, pool.epochs),
        weight_features=None,
        hub_entry_ids=ids,
    )
    return _Opened(source, lambda: pool_features(pool))


def _open_pool_folder(folder: Path, path: str) -> _Opened:
    try:
        settings = json.loads((folder / TASK_FILE).read_text())
    except (OSError, ValueError) as error:
        raise FMSError(f"pool folder {path}: {TASK_FILE} is unreadable ({one_line(error)})") from None
    task_file = settings.get("task_file") if isinstance(settings, dict) else None
    if not task_file:
        raise FMSError(
            f"pool folder {path}: {TASK_FILE} names no task file (the pool was built from a task given in code); "
            "the pool's hub and space are built from its task file"
        )
    if not Path(task_file).is_file():
        raise FMSError(
            f"pool folder {path}: its task file {task_file} is gone ({TASK_FILE} names it; the pool's hub and space "
            "are built from it)"
        )
    task = BenchTask.from_file(task_file)
    fingerprint = task.fingerprint()
    data = read_pool_file(folder, fingerprint)
    if data is None:
        stored = str(settings.get("fingerprint", ""))
        if stored != fingerprint:
            raise FMSError(
                f"pool folder {path}: its task file {task_file} changed since the pool was built (fingerprint "
                f"{fingerprint[:12]}, the pool's {stored[:12] or 'none'})"
            )
        raise FMSError(
            f"pool folder {path} is incomplete ({POOL_FILE} or a configuration's weights are missing; finish it: "
            f"python -m lightning_fms.bench.pool {task_file})"
        )
    hub = task.load_hub()
    return _open_pool(pool_from_data(task, folder, data, hub), task, path, hub)


# ------------------------------------------------------------------ studies
def _open_study(directory: Path, path: str) -> _Opened:
    study = StudyDirectory(directory)
    state = study.load_state() if (directory / study.STATE_FILE).is_file() else _read_study_json(directory, path)
    settings = state.get("settings") if isinstance(state, dict) else None
    trials = state.get("trials") if isinstance(state, dict) else None
    if not isinstance(settings, dict) or not isinstance(trials, list) or "space" not in settings:
        raise FMSError(
            f"study directory {path}: its state has no settings or trials (not written by lightning-fms tune)"
        )
    if settings.get("frozen_layers"):
        raise FMSError(
            f"study directory {path} trained with frozen layers (frozen_layers): its epochs trained different "
            "fractions of the network, which source rows do not describe"
        )
    try:
        space = SearchSpace.from_dict(settings["space"])
        cap = int(settings["cap"])
        records = sorted(trials, key=lambda t: int(t["id"]))
        configs = [dict(t["config"]) for t in records]
        for config in configs:
            space.validate(config)
        values = np.full((len(records), cap), np.nan)
        for row, trial in zip(values, records):
            observed = [float(v) for v in trial["values"]][:cap]
            row[: len(observed)] = observed
    except FMSError as error:
        raise FMSError(f"study directory {path}: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise FMSError(f"study directory {path}: its state is malformed ({type(error).__name__}: {error})") from None
    mode = _mode(settings.get("mode"), path)
    snapshots = WeightSnapshots(study.weights_dir, max_in_memory=1)
    ids = _study_hub_ids(snapshots, space)
    fingerprint = _study_fingerprint(settings, records, ids)
    source = SourceTask(
        name=directory.resolve().name,
        origin="study",
        fingerprint=fingerprint,
        path=path,
        space=space,
        mode=mode,
        cap=cap,
        configs=configs,
        values=values,
        weight_features=None,
        hub_entry_ids=ids,
    )
    trial_ids = [(int(t["id"]), config) for t, config in zip(records, configs)]
    return _Opened(
        source,
        lambda: study_features(snapshots, space, trial_ids, cap),
        _why_no_weights(study, snapshots, space, configs, ids, path),
    )


def _read_study_json(directory: Path, path: str) -> dict[str, Any]:
    try:
        state = json.loads((directory / STUDY_JSON).read_text())
    except (OSError, ValueError) as error:
        raise FMSError(f"study directory {path}: {STUDY_JSON} is unreadable ({one_line(error)})") from None
    if not isinstance(state, dict):
        raise FMSError(f"study directory {path}: {STUDY_JSON} is not a mapping")
    return state


def _study_hub_ids(snapshots: WeightSnapshots, space: SearchSpace) -> dict[str, str]:
    """Each hub entry's id from the study's snapshot of its pretrained weights (``""`` when there is none)."""
    ids: dict[str, str] = {}
    for entry in _hub_entries(space):
        key = ("hub", entry)
        if key not in snapshots:
            ids[entry] = ""
            continue
        description = snapshots.description(key) or {}
        recorded = description.get("sha256")
        ids[entry] = recorded if isinstance(recorded, str) and recorded else tensors_sha256(snapshots.get(key))
    return ids


def _study_fingerprint(settings: dict[str, Any], records: list[dict[str, Any]], ids: dict[str, str]) -> str:
    """Hex SHA-256 of what is read from a study: its settings, its trials' results and its hub entries' ids."""
    trials = [
        dict(id=int(t["id"]), config=t["config"], values=[float(v) for v in t["values"]], status=t.get("status"))
        for t in records
    ]
    payload = {"settings": settings, "trials": trials, "hub": ids}
    text = json.dumps(payload, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _why_no_weights(
    study: StudyDirectory,
    snapshots: WeightSnapshots,
    space: SearchSpace,
    configs: list[dict[str, Any]],
    ids: dict[str, str],
    path: str,
) -> str | None:
    """Why a study's weight features cannot be read (``None`` when they can)."""
    recorded = study.weights_dir.is_dir() and any(study.weights_dir.glob("trial-*.safetensors"))
    if not recorded or space.hub_key is None:
        return (
            f"study directory {path} recorded no weights (a study records them when its searcher reads weights: "
            "tuner weights: summary, or auto with searcher fms on a hub); read it without weights"
        )
    used = list(dict.fromkeys(str(c[space.hub_key]) for c in configs))
    missing = [entry for entry in used if not ids.get(entry)]
    if missing:
        return (
            f"study directory {path} has no snapshot of the pretrained weights of hub entry {missing[0]!r} "
            f"({snapshots.path(('hub', missing[0]))}; studies of older versions lack it: resume the study once with "
            "lightning-fms tune to add it, or read it without weights)"
        )
    return None


# ------------------------------------------------------------------ helpers
def _hub_entries(space: SearchSpace) -> list[str]:
    if space.hub_key is None:
        return []
    param = space[space.hub_key]
    return [str(c) for c in param.choices] if isinstance(param, HubChoice) else []


def _mode(mode: Any, path: str) -> str:
    if mode not in ("max", "min"):
        raise FMSError(f"source {path} has mode {mode!r}; expected 'max' or 'min'")
    return str(mode)
