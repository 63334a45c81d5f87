"""Run every (task, method, seed) of a benchmark, cache each run, and write the tables and the report.

Layout of ``out_dir``::

    runs/{task}/{method}/seed-{seed}.json   one MethodRun each, written atomically
    results.csv                             one row per method, task, seed and epoch spent
    kendall.csv                             one row per forecast check of a surrogate method
    summary.md, *.png                       the report (lightning_fms.bench.report)

A run whose JSON exists with the same settings (budget, forecast checks, surrogate options, what a freeze-thaw
method resolves to (searcher, featurizer, curve encoder, hub regime: a changed library default reruns ``fms``),
the pool's fingerprint and the record format) is not run again, so an interrupted benchmark resumes where it stopped;
a run with other settings is run again and overwritten.

With ``jobs > 1`` runs go to that many spawned processes with one torch thread each. In-memory pools must
then pickle; pools from task files are given as :class:`PoolSource` and re-loaded (never rebuilt) once per
worker process.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lightning_fms.atomic import atomic_write_text
from lightning_fms.bench.methods import METHODS, MethodRun, RunOptions, check_methods, run_method
from lightning_fms.bench.metrics import RegretBounds, normalised_regret, to_scores
from lightning_fms.bench.peers import import_optuna
from lightning_fms.bench.pool_data import Pool
from lightning_fms.bench.report import ReportMeta, safe_name, write_report
from lightning_fms.errors import FMSError
from lightning_fms.extras import import_optional

#: Version of the run record; part of every cached run's settings (bump it to invalidate cached runs).
RUN_FORMAT = 1

RESULT_COLUMNS = (
    "method",
    "task",
    "seed",
    "epochs_spent",
    "config",
    "epoch",
    "val",
    "test",
    "best_val",
    "incumbent_test",
    "regret",
    "test_regret",
    "train_s",
    "decision_s",
    "wall_s",
    "trials_started",
)
KENDALL_COLUMNS = ("method", "task", "seed", "epochs_spent", "kendall_tau", "kendall_p", "spearman", "n_configs")


@dataclass(frozen=True)
class PoolSource:
    """A pool given by its task file: loaded in the main process and re-loaded in each worker.

    Attributes:
        task_file: The task YAML (see :class:`lightning_fms.bench.task.BenchTask`).
        cache_dir: Where pools are cached (``None``: ``load_pool``'s default).
        build: Whether the main process may build a missing pool (workers never build).
        build_jobs: Processes ``load_pool`` may use to build it.
    """

    task_file: str
    cache_dir: str | None = None
    build: bool = True
    build_jobs: int = 1

    def load(self, build: bool | None = None) -> Pool:
        """Load (or, with ``build``, build) the pool."""
        try:
            from lightning_fms.bench.pool import load_pool
            from lightning_fms.bench.task import BenchTask
        except ImportError as error:
            raise FMSError(f"cannot load task pools here: {error}") from None

        task = BenchTask.from_file(self.task_file)
        return load_pool(
            task, cache_dir=self.cache_dir, build=self.build if build is None else build, jobs=self.build_jobs
        )


@dataclass
class BenchResult:
    """What :func:`run_bench` did.

    Attributes:
        runs: Every run record, new or cached.
        ran: Runs computed by this call.
        cached: Runs taken from ``out_dir/runs``.
        results_csv: Path of ``results.csv``.
        kendall_csv: Path of ``kendall.csv``.
        summary: Path of ``summary.md``.
    """

    runs: list[MethodRun]
    ran: int
    cached: int
    results_csv: Path
    kendall_csv: Path
    summary: Path
    figures: list[Path] = field(default_factory=list)


def pool_fingerprint(pool: Pool) -> str:
    """SHA-256 of what a run depends on in a pool: name, mode, configurations and the three tables."""
    digest = hashlib.sha256()
    digest.update(
        repr((pool.name, pool.mode, [sorted((k, repr(v)) for k, v in c.items()) for c in pool.configs])).encode()
    )
    for table in (pool.val, pool.test, pool.train_seconds):
        array = np.ascontiguousarray(np.asarray(table, dtype=np.float64))
        digest.update(repr(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def run_path(out_dir: Path, task: str, method: str, seed: int) -> Path:
    """Where the run of ``method`` with ``seed`` on ``task`` is cached."""
    return Path(out_dir) / "runs" / safe_name(task) / safe_name(method) / f"seed-{int(seed)}.json"


@dataclass(frozen=True)
class _Job:
    task: str
    method: str
    seed: int
    budget: int
    kendall_at: tuple[int, ...]
    options: RunOptions
    settings: dict[str, Any]
    path: str


def _settings(
    method: str, budget: int, kendall_at: Sequence[int], options: RunOptions, fingerprint: str
) -> dict[str, Any]:
    spec = METHODS[method]
    checks = sorted({int(k) for k in kendall_at if 1 <= int(k) <= budget}) if spec.forecasts else []
    settings = {
        "format": RUN_FORMAT,
        "budget": int(budget),
        "kendall_at": checks,
        "options": options.to_dict() if spec.forecasts else {},
        "pool": fingerprint,
    }
    resolved = spec.settings()  # what the method runs now: a changed library default invalidates `fms` runs
    if resolved:
        settings["method"] = resolved
    return settings


def _load_cached(path: Path, settings: Mapping[str, Any]) -> MethodRun | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("bench_settings") != dict(settings):
        return None
    return MethodRun.from_dict(data)


def _execute(job: _Job, pool: Pool) -> MethodRun:
    run = run_method(job.method, pool, job.budget, job.seed, job.kendall_at, options=job.options)
    atomic_write_text(Path(job.path), json.dumps({**run.to_dict(), "bench_settings": job.settings}))
    return run


# ----------------------------------------------------------------------------------------------- workers
_WORKER_POOLS: dict[str, Pool | PoolSource] = {}


def _init_worker(payloads: dict[str, Pool | PoolSource]) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER_POOLS.clear()
    _WORKER_POOLS.update(payloads)


def _worker_run(job: _Job) -> dict[str, Any]:
    payload = _WORKER_POOLS[job.task]
    if isinstance(payload, PoolSource):
        payload = payload.load(build=False)
        _WORKER_POOLS[job.task] = payload
    return _execute(job, payload).to_dict()


def _worker_payloads(items: Sequence[Pool | PoolSource], pools: list[Pool]) -> dict[str, Pool | PoolSource]:
    payloads: dict[str, Pool | PoolSource] = {}
    for item, pool in zip(items, pools, strict=True):
        if isinstance(item, PoolSource):
            payloads[pool.name] = item
            continue
        try:
            pickle.dumps(pool)
        except Exception as error:  # noqa: BLE001 - any pickling failure means the same thing here
            raise FMSError(
                f"pool {pool.name!r} cannot be sent to worker processes ({type(error).__name__}); "
                "use jobs=1 or give it as a PoolSource (task file)"
            ) from None
        payloads[pool.name] = pool
    return payloads


# ----------------------------------------------------------------------------------------------- tables
def result_rows(run: MethodRun, bounds: RegretBounds, mode: str) -> list[dict[str, Any]]:
    """The ``results.csv`` rows of one run (regret, test regret and the trials started so far added)."""
    regret = normalised_regret(to_scores(run.column("best_val"), mode), bounds.best_val, bounds.worst_val)
    test_regret = normalised_regret(to_scores(run.column("incumbent_test"), mode), bounds.best_test, bounds.worst_test)
    rows = []
    begun: set[int] = set()
    for row, r, t in zip(run.rows, regret, test_regret, strict=True):
        begun.add(int(row["config"]))
        rows.append(
            {
                "method": run.method,
                "task": run.task,
                "seed": run.seed,
                **row,
                "regret": float(r),
                "test_regret": float(t),
                "trials_started": len(begun),
            }
        )
    return rows


def kendall_rows(run: MethodRun) -> list[dict[str, Any]]:
    """The ``kendall.csv`` rows of one run."""
    return [
        {"method": run.method, "task": run.task, "seed": run.seed, **{k: rec[k] for k in KENDALL_COLUMNS[3:]}}
        for rec in run.kendall
    ]


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    return out.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value


def _collect_notes(runs: Sequence[MethodRun]) -> dict[str, dict[str, list[str]]]:
    notes: dict[str, dict[str, list[str]]] = {}
    for run in runs:
        bucket = notes.setdefault(run.task, {}).setdefault(run.method, [])
        bucket.extend(n for n in run.notes if n not in bucket)
    return {task: {m: texts for m, texts in methods.items() if texts} for task, methods in notes.items()}


# ----------------------------------------------------------------------------------------------- entry point
def _leave_one_out_priors(
    names: Sequence[str],
    items: Sequence[Pool | PoolSource],
    loaded: Sequence[Pool],
    fingerprints: Mapping[str, str],
    out: Path,
    say: Callable[[str], Any],
    prior_options: Mapping[str, Any] | None = None,
) -> dict[tuple[str, str], str]:
    """``(prior kind, held-out task) -> prior file`` for the methods that use a prior (pretrained now if missing)."""
    kinds = sorted({kind for kind in (METHODS[m].prior_kind for m in names) if kind is not None})
    if not kinds:
        return {}
    from lightning_fms.bench.transfer import leave_one_out_prior

    sources: dict[str, str] = {}
    cache_dirs: set[str | None] = set()
    for item, pool in zip(items, loaded, strict=True):
        if isinstance(item, PoolSource):
            sources[pool.name] = item.task_file
            cache_dirs.add(item.cache_dir)
        elif pool.meta.get("folder"):
            sources[pool.name] = str(pool.meta["folder"])
            cache_dirs.add(str(Path(pool.meta["folder"]).parents[2]))  # {cache}/bench/pools/{name}
        else:
            raise FMSError(
                f"the *-prior methods pretrain on the other tasks' pools; task {pool.name!r} has no pool folder"
            )
    cache_dir = next(iter(cache_dirs)) if len(cache_dirs) == 1 else None
    return {
        (kind, pool.name): str(
            leave_one_out_prior(
                kind,
                pool.name,
                sources,
                dict(fingerprints),
                out,
                cache_dir=cache_dir,
                say=say,
                overrides=dict(prior_options or {}),
            )
        )
        for kind in kinds
        for pool in loaded
    }


def run_bench(
    pools: Sequence[Pool | PoolSource],
    methods: Sequence[str] | None = None,
    seeds: int | Sequence[int] = 10,
    budget: int = 100,
    out_dir: str | os.PathLike[str] = "bench",
    jobs: int = 1,
    kendall_at: Sequence[int] = (50, 100),
    progress: Callable[[str], Any] | None = print,
    *,
    options: RunOptions | None = None,
    command: str | None = None,
    prior_options: Mapping[str, Any] | None = None,
) -> BenchResult:
    """Run each method with each seed on each pool (cached, resumable), then write the tables and the report.

    Args:
        pools: Pools in memory, or :class:`PoolSource` task files (needed for ``jobs > 1`` when a pool does not
            pickle).
        methods: Names in :data:`~lightning_fms.bench.methods.METHODS` (default: all).
        seeds: A number of seeds ``S`` (seeds ``0 .. S-1``) or the seeds themselves.
        budget: Epochs each run spends.
        out_dir: Output directory.
        jobs: Worker processes (1: everything in this process).
        kendall_at: Epochs spent at which the surrogate methods' forecasts are rank-correlated with the truth.
        progress: Called with one line per finished run (``None``: silent).
        options: Surrogate options of the forecasting methods.
        command: The command line, for the report.
        prior_options: Pretraining options (:class:`~lightning_fms.transfer.pretrain.PretrainOptions` fields) of
            the leave-one-task-out priors of the ``*-prior`` methods, beyond each prior kind's own.

    Returns:
        What was run and written.

    Raises:
        FMSError: unknown methods, an empty or duplicate task list, bad seeds, budget or jobs.
    """
    names = check_methods(list(methods) if methods is not None else list(METHODS))
    if not names:
        raise FMSError("no method to run")
    seed_list = list(range(seeds)) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise FMSError(f"seeds must be a positive count or distinct integers, got {seeds!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise FMSError(f"jobs must be an integer >= 1, got {jobs!r}")
    if not pools:
        raise FMSError("no task to run")
    if "optuna" in names:
        import_optuna()  # fail now, not after hours of other runs
    import_optional("matplotlib", "plots", "the benchmark's figures")  # likewise
    options = options or RunOptions()
    say = progress or (lambda _line: None)
    out = Path(out_dir)
    loaded = [item.load() if isinstance(item, PoolSource) else item for item in pools]
    task_names = [p.name for p in loaded]
    if len(set(map(safe_name, task_names))) != len(task_names):
        raise FMSError(f"task names must be distinct, got {task_names}")
    for pool in loaded:
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= pool.size * pool.epochs:
            raise FMSError(
                f"budget must be an integer in [1, {pool.size * pool.epochs}] for task {pool.name!r}, got {budget!r}"
            )
    by_name = dict(zip(task_names, loaded, strict=True))
    fingerprints = {p.name: pool_fingerprint(p) for p in loaded}
    priors = _leave_one_out_priors(names, pools, loaded, fingerprints, out, say, prior_options)

    runs: dict[tuple[str, str, int], MethodRun] = {}
    todo: list[_Job] = []
    for seed in seed_list:  # seed-major: an interrupted run leaves whole seeds done, for every task and method
        for pool in loaded:
            for method in names:
                kind = METHODS[method].prior_kind
                job_options = options if kind is None else replace(options, prior=priors[(kind, pool.name)])
                settings = _settings(method, budget, kendall_at, job_options, fingerprints[pool.name])
                path = run_path(out, pool.name, method, seed)
                cached = _load_cached(path, settings)
                if cached is not None:
                    runs[(pool.name, method, seed)] = cached
                else:
                    job = _Job(pool.name, method, seed, budget, tuple(kendall_at), job_options, settings, str(path))
                    todo.append(job)
    total = len(runs) + len(todo)
    if runs:
        say(f"bench: {len(runs)} of {total} runs cached in {out / 'runs'}; {len(todo)} to run")
    bounds = {p.name: RegretBounds.of(p.val, p.test, p.mode) for p in loaded}

    def report(job: _Job, run: MethodRun) -> None:
        runs[(job.task, job.method, job.seed)] = run
        pool = by_name[job.task]
        final = result_rows(run, bounds[job.task], pool.mode)[-1]["regret"] if run.rows else math.nan
        say(
            f"[{len(runs)}/{total}] {job.task} {job.method} seed {job.seed}: regret {final:.4f} "
            f"after {run.epochs_spent} epochs, {run.run_s:.1f}s"
        )

    if todo and jobs == 1:
        for job in todo:
            report(job, _execute(job, by_name[job.task]))
    elif todo:
        payloads = _worker_payloads(pools, loaded)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(payloads,)) as pool_exec:
            pending: dict[Future[dict[str, Any]], _Job] = {pool_exec.submit(_worker_run, job): job for job in todo}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        job = pending.pop(future)
                        report(job, MethodRun.from_dict(future.result()))
            except BaseException:
                pool_exec.shutdown(wait=True, cancel_futures=True)  # finish the runs in flight, start no other
                raise

    ordered = [runs[(p.name, m, s)] for p in loaded for m in names for s in seed_list]
    results = [row for run in ordered for row in result_rows(run, bounds[run.task], by_name[run.task].mode)]
    kendall = [row for run in ordered for row in kendall_rows(run)]
    results_csv, kendall_csv = out / "results.csv", out / "kendall.csv"
    atomic_write_text(results_csv, _csv_text(results, RESULT_COLUMNS))
    atomic_write_text(kendall_csv, _csv_text(kendall, KENDALL_COLUMNS))

    meta = ReportMeta(
        command=command,
        budget=int(budget),
        seeds=seed_list,
        kendall_at=sorted({int(k) for k in kendall_at if 1 <= int(k) <= budget}),
        methods=names,
        tasks=[
            {
                "name": p.name,
                "size": p.size,
                "epochs": p.epochs,
                "mode": p.mode,
                "bounds": bounds[p.name].to_dict(),
                "fingerprint": fingerprints[p.name][:12],
            }
            for p in loaded
        ],
        options=options.to_dict(),
        exhausted=[f"{r.task}/{r.method}/seed-{r.seed}" for r in ordered if r.exhausted],
        run_seconds=float(sum(r.run_s for r in ordered)),
        notes=_collect_notes(ordered),
    )
    started = time.perf_counter()
    summary, figures = write_report(out, results, kendall, meta)
    say(f"bench: wrote {results_csv}, {kendall_csv} and {summary} ({time.perf_counter() - started:.1f}s)")
    return BenchResult(ordered, len(todo), total - len(todo), results_csv, kendall_csv, summary, figures)
