"""Building a benchmark pool: train each sampled configuration once, record its curves and weights.

Every configuration is trained as trial ``index`` of a study with the task's pool seed, with the Trainer of
:func:`~lightning_fms.training.trainer.trainer_for`, so epoch ``k`` equals what the tuner's executor records for
that trial (the pool is a valid stand-in for real training only while that holds). Storage and reading back:
:mod:`lightning_fms.bench.pool_data`.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import platform
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_fms.atomic import atomic_write_bytes, atomic_write_text
from lightning_fms.bench.pool_data import (
    CONFIG_DIR,
    POOL_FILE,
    TASK_FILE,
    Pool,
    config_files,
    folder_bytes,
    pool_dir,
    pool_from_data,
    read_pool_file,
)
from lightning_fms.bench.task import POOL_BUILDER_VERSION, BenchTask, TestMetric
from lightning_fms.errors import FMSError, failure_message, one_line
from lightning_fms.search.seeds import derive_seed
from lightning_fms.search.space import SearchSpace
from lightning_fms.search.trial import config_key
from lightning_fms.threads import torch_threads
from lightning_fms.training.callback import FMSCheckpointCallback
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.training.quiet import quiet_lightning
from lightning_fms.training.seeder import initial_seed
from lightning_fms.training.trainer import divergence, trainer_for


def accuracy(module: nn.Module, dataloader: DataLoader) -> float:
    """Top-1 accuracy of ``module``'s forward over a loader of ``(x, y)`` batches (the default test metric).

    Called in eval mode under ``torch.no_grad()``; batches go to the module's device.

    Args:
        module: Maps ``x`` (e.g. ``[B, 1, 8, 8]``) to logits ``[B, K]``.
        dataloader: Yields ``(x, y)`` with ``y`` ``[B]`` integer labels.

    Returns:
        The fraction of correct argmax predictions (``nan`` for an empty loader).
    """
    device = next(iter(module.parameters()), torch.empty(0)).device
    correct, total = 0, 0
    for x, y in dataloader:
        logits = module(x.to(device))
        correct += int((logits.argmax(dim=-1) == y.to(device)).sum())
        total += int(y.numel())
    return correct / total if total else math.nan


def sample_configs(space: SearchSpace, size: int, seed: int) -> list[dict[str, Any]]:
    """``size`` distinct configurations drawn from ``space`` with a generator seeded by ``seed``.

    The draws are a stream, so a larger pool of the same seed starts with the same configurations.

    Raises:
        FMSError: the space has fewer than ``size`` distinct configurations.
    """
    rng = np.random.default_rng(derive_seed(seed, "pool", "configs"))
    configs: list[dict[str, Any]] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    repeats = 0
    while len(configs) < size:
        config = space.sample(rng)
        key = config_key(config)
        if key in seen:
            repeats += 1
            if repeats > 100 * size:
                raise FMSError(f"the space has fewer than {size} distinct configurations (pool.size is too large)")
            continue
        seen.add(key)
        configs.append(config)
    return configs


class _EpochRecorder(Callback):
    """Times each epoch, computes the test value after each validation, and stops a failed trial.

    The test value is computed with the module in eval mode under ``no_grad`` and with the global random
    state forked, so it changes neither the module's modes nor the random numbers training draws.
    A trial fails at the same epoch and for the same reason as under the tuner's executor.
    """

    def __init__(self, checkpoint: FMSCheckpointCallback, test_metric: TestMetric) -> None:
        self.checkpoint = checkpoint
        self.test_metric = test_metric
        self.seconds: list[float] = []
        self.test: list[float] = []
        self.failed_epoch: int | None = None
        self.error: str | None = None
        self._start = 0.0
        self._loader: DataLoader | None = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.seconds.append(time.perf_counter() - self._start)
        modes = {name: sub.training for name, sub in pl_module.named_modules()}
        pl_module.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                if self._loader is None:
                    self._loader = _test_loader(trainer.datamodule)
                value = float(self.test_metric(pl_module, self._loader))
        finally:
            for name, sub in pl_module.named_modules():
                sub.training = modes[name]
        self.test.append(value)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        report = self.checkpoint.last
        if report is None or report.epoch != epoch:
            error: str | None = f"no validation ran in epoch {epoch}"
        elif report.error is not None and self.checkpoint.monitor not in report.available_metrics:
            raise FMSError(report.error)
        else:
            error = report.error or divergence(trainer, pl_module)
        if error is not None:
            self.failed_epoch, self.error = epoch, error
            trainer.should_stop = True


def _test_loader(datamodule: pl.LightningDataModule | None) -> DataLoader:
    """The datamodule's ``test_dataloader()`` after ``setup("test")``.

    Raises:
        FMSError: there is no datamodule or it gives no test loader.
    """
    if datamodule is None:
        raise FMSError("a pool needs a LightningDataModule with a test_dataloader()")
    try:
        datamodule.setup("test")
        return datamodule.test_dataloader()
    except Exception as error:
        raise FMSError(
            f"{type(datamodule).__name__} gives no test_dataloader() ({one_line(error)}); "
            "a pool's test curve needs one (DigitsDataModule/MnistDataModule: set data.init_args.test_fraction)"
        ) from None


def _finite_or_none(values: list[float], length: int) -> list[float | None]:
    padded = list(values[:length]) + [math.nan] * (length - len(values))
    return [float(v) if math.isfinite(v) else None for v in padded]


def _train_config(
    task: BenchTask,
    executor: InProcessExecutor,
    test_metric: TestMetric,
    folder: Path,
    index: int,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Train configuration ``index`` for ``task.epochs`` epochs in one fit and write its two files.

    The configuration is trained as trial ``index`` of a study with seed ``task.pool_seed``: the same
    initialisation seed and the same Trainer (:func:`~lightning_fms.training.trainer.trainer_for`) as under the
    tuner's executor, so epoch ``k`` equals what it records for that trial.

    Returns:
        The record written to ``configs/<index>.json``.
    """
    start = time.perf_counter()
    seed = task.pool_seed
    epochs = task.epochs
    trial = executor.build_trial(config, seed=initial_seed(seed, index))
    checkpoint = FMSCheckpointCallback(monitor=executor.monitor, weights_attribute=executor.weights_attribute)
    recorder = _EpochRecorder(checkpoint, test_metric)
    with quiet_lightning():
        trainer = trainer_for(
            trial.module,
            epochs=epochs,
            seed=seed,
            trial_id=index,
            checkpoint=checkpoint,
            callbacks=[recorder],
            options=trial.trainer_options,
        )
        try:
            trainer.fit(trial.module, datamodule=trial.datamodule)
        except (KeyboardInterrupt, FMSError):
            raise
        except Exception as error:  # the configuration fails here, as a trial would under the tuner
            if recorder.failed_epoch is None:
                recorder.failed_epoch = trainer.current_epoch + 1
                recorder.error = failure_message(error)
    done = epochs if recorder.failed_epoch is None else recorder.failed_epoch - 1
    if recorder.failed_epoch is None and len(checkpoint.reports) < epochs:
        recorder.failed_epoch = len(checkpoint.reports) + 1
        recorder.error = f"the fit stopped after {len(checkpoint.reports)} of {epochs} epochs"
        done = len(checkpoint.reports)
    tensors: dict[str, torch.Tensor] = {}
    for report in checkpoint.reports[:done]:
        assert report.weights is not None
        for name, value in report.weights.items():
            stored = value.to(torch.float16) if value.is_floating_point() else value
            tensors[f"e{report.epoch:02d}/{name}"] = stored.contiguous()
    # one metadata key: safetensors writes several in no fixed order, and the bytes must be reproducible
    payload = save_safetensors(tensors, metadata={"lightning_fms.bench.pool": f"{task.name} #{index}"})
    weights_path, record_path = config_files(folder, index)
    atomic_write_bytes(weights_path, payload)
    record = {
        "index": index,
        "config": config,
        "fingerprint": task.fingerprint(),
        "val": _finite_or_none([r.value for r in checkpoint.reports[:done]], epochs),
        "test": _finite_or_none(recorder.test[:done], epochs),
        "train_seconds": _finite_or_none(recorder.seconds[: done + (recorder.failed_epoch is not None)], epochs),
        "failed_epoch": recorder.failed_epoch,
        "error": recorder.error,
        "fit_seconds": time.perf_counter() - start,
        "weights_sha256": hashlib.sha256(payload).hexdigest(),
    }
    atomic_write_text(record_path, json.dumps(record))
    return record


def _read_record(folder: Path, index: int, fingerprint: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a finished configuration, or ``None`` when it must be (re)trained."""
    weights_path, record_path = config_files(folder, index)
    if not (weights_path.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint or config_key(record.get("config", {})) != config_key(config):
        return None
    return record


# ------------------------------------------------------------------ worker processes
_WORKER_STATE: dict[str, tuple[InProcessExecutor, TestMetric]] = {}


def _init_worker() -> None:
    torch.set_num_threads(1)


def _train_in_worker(task: BenchTask, folder: str, index: int, config: dict[str, Any]) -> dict[str, Any]:
    """:func:`_train_config` in a worker process (the task's executor is built once per process)."""
    key = task.fingerprint()
    if key not in _WORKER_STATE:
        _WORKER_STATE[key] = (task.build_executor(), task.test_metric_fn())
    executor, metric = _WORKER_STATE[key]
    return _train_config(task, executor, metric, Path(folder), index, config)


def build_pool(
    task: BenchTask,
    cache_dir: str | os.PathLike[str] | None = None,
    jobs: int = 1,
    verbose: bool = False,
) -> Pool:
    """Train every configuration of a task's pool that is not stored yet, then write and return the pool.

    Samples ``task.pool_size`` configurations (seeded by ``task.pool_seed``), trains each for
    ``task.epochs`` epochs in one Lightning ``fit`` (one torch thread per process), and records after each
    epoch the monitored validation value, the test value, the epoch's seconds and the weights. Finished
    configurations are skipped, so an interrupted build resumes where it stopped.

    Args:
        task: The task.
        cache_dir: The cache root (default :func:`~lightning_fms.zoo.build.default_cache_dir`); the pool
            lives in :func:`pool_dir`.
        jobs: Worker processes (``spawn``, one torch thread each); 1 trains in this process.
        verbose: Print progress lines.

    Returns:
        The complete pool (the stored one, untouched, when it is complete already).

    Raises:
        FMSError: a bad ``jobs``, a task that cannot be built, or a datamodule without a test split.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise FMSError(f"jobs must be an integer >= 1, got {jobs!r}")
    start = time.perf_counter()
    hub = task.load_hub()
    fingerprint = task.fingerprint()
    folder = pool_dir(task, cache_dir)
    stored = read_pool_file(folder, fingerprint)
    if stored is not None:
        return pool_from_data(task, folder, stored, hub)
    executor = task.build_executor(hub)
    test_metric = task.test_metric_fn()
    configs = sample_configs(task.build_space(hub), task.pool_size, task.pool_seed)
    (folder / CONFIG_DIR).mkdir(parents=True, exist_ok=True)
    settings = {
        "name": task.name,
        "fingerprint": fingerprint,
        "task_file": str(task.path) if task.path else None,
        "size": task.pool_size,
        "epochs": task.epochs,
        "seed": task.pool_seed,
        "test_metric": task.test_metric,
        "configs": configs,
    }
    atomic_write_text(folder / TASK_FILE, json.dumps(settings, indent=1))
    records: dict[int, dict[str, Any]] = {}
    for index, config in enumerate(configs):
        record = _read_record(folder, index, fingerprint, config)
        if record is not None:
            records[index] = record
    missing = [i for i in range(len(configs)) if i not in records]
    if missing:
        with torch.random.fork_rng(devices=[]):
            _, datamodule = executor.build(configs[missing[0]])
            _test_loader(datamodule)
    progress = _Progress(task.name, len(missing), len(configs), verbose)
    if missing and jobs == 1:
        with torch_threads(1):
            for index in missing:
                records[index] = _train_config(task, executor, test_metric, folder, index, configs[index])
                progress.step(records[index])
    elif missing:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker) as workers:
            futures = [workers.submit(_train_in_worker, task, str(folder), i, configs[i]) for i in missing]
            try:
                for future in as_completed(futures):
                    record = future.result()
                    records[int(record["index"])] = record
                    progress.step(record)
            except BaseException:
                workers.shutdown(wait=False, cancel_futures=True)  # what finished is stored; the rest waits
                raise
    ordered = [records[i] for i in range(len(configs))]
    failures = {
        str(r["index"]): {"epoch": r["failed_epoch"], "error": r["error"]}
        for r in ordered
        if r["failed_epoch"] is not None
    }
    meta = {
        "task": task.name,
        "task_file": settings["task_file"],
        "fingerprint": fingerprint,
        "monitor": task.recipe.monitor,
        "test_metric": task.test_metric,
        "seed": task.pool_seed,
        "hub": hub.name,
        "hub_file": str(hub.path),
        "builder_version": POOL_BUILDER_VERSION,
        "build_seconds": round(time.perf_counter() - start, 3),
        "configs_trained_in_last_build": len(missing),
        "fit_seconds_total": round(sum(float(r["fit_seconds"]) for r in ordered), 3),
        "jobs": jobs,
        "failures": failures,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "weights_dtype": "float16",
    }
    data = {
        "name": task.name,
        "fingerprint": fingerprint,
        "mode": task.recipe.mode,
        "epochs": task.epochs,
        "configs": configs,
        "val": [r["val"] for r in ordered],
        "test": [r["test"] for r in ordered],
        "train_seconds": [r["train_seconds"] for r in ordered],
        "meta": meta,
    }
    atomic_write_text(folder / POOL_FILE, json.dumps(data))
    return pool_from_data(task, folder, data, hub)


def build_pools(
    paths: Sequence[str | os.PathLike[str]],
    jobs: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    verbose: bool = True,
) -> list[Pool]:
    """Build (or load) the pools of several task files, one after the other.

    Every file is read and validated before anything trains.

    Args:
        paths: Task files.
        jobs: Worker processes per pool.
        cache_dir: The cache root.
        verbose: Print one summary line per task (and progress lines while building).

    Returns:
        The pools, in the order of ``paths``.
    """
    tasks = [BenchTask.from_file(path) for path in paths]
    pools = []
    for task in tasks:
        start = time.perf_counter()
        folder = pool_dir(task, cache_dir)
        data = read_pool_file(folder, task.fingerprint())
        if data is not None:
            pool = pool_from_data(task, folder, data)
        else:
            if verbose:
                print(f"{task.name}: {task.pool_size} configurations x {task.epochs} epochs -> {folder}", flush=True)
            pool = build_pool(task, cache_dir=cache_dir, jobs=jobs, verbose=verbose)
        if verbose:
            print(_summary(pool, time.perf_counter() - start), flush=True)
        pools.append(pool)
    return pools


def _summary(pool: Pool, seconds: float) -> str:
    final = pool.val[:, -1]
    finite = final[np.isfinite(final)]
    best = (np.max(finite) if pool.mode == "max" else np.min(finite)) if finite.size else math.nan
    median = float(np.median(finite)) if finite.size else math.nan
    size_mb = folder_bytes(pool.meta["folder"]) / 2**20
    return (
        f"{pool.name}: {pool.size} configurations x {pool.epochs} epochs in {seconds:.1f}s "
        f"(built in {pool.meta.get('build_seconds', math.nan):.1f}s); final val best {best:.4f}, "
        f"median {median:.4f}; {len(pool.meta.get('failures', {}))} failed; {size_mb:.1f} MiB in {pool.meta['folder']}"
    )


class _Progress:
    """Prints about 20 progress lines per build (every line when there are few configurations)."""

    def __init__(self, name: str, todo: int, total: int, verbose: bool) -> None:
        self.name, self.todo, self.total, self.verbose = name, todo, total, verbose
        self.done = 0
        self.every = max(1, todo // 20)
        self.start = time.perf_counter()
        if verbose and todo < total:
            print(f"{name}: {total - todo} of {total} configurations already stored", flush=True)

    def step(self, record: dict[str, Any]) -> None:
        self.done += 1
        if not self.verbose or (self.done % self.every and self.done != self.todo):
            return
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.todo - self.done)
        print(
            f"{self.name}: {self.done}/{self.todo} trained, {elapsed:.0f}s elapsed, ~{left:.0f}s left",
            flush=True,
        )
