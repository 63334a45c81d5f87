"""A simulated cluster: a :class:`~lightning_fms.parallel.protocol.ConcurrentExecutor` of N workers on a virtual clock.

It drives the real decider (optimizer, searcher, ledger, driver) at a scale this machine cannot train at, to
measure whether the central driver keeps the workers busy. It never trains: an epoch's duration is drawn from
:class:`EpochTimes` (lognormal, 60 s median by default), its value comes from
:class:`~lightning_fms.parallel.synthetic.LearningCurves`, and it writes a tiny real checkpoint at
``job.checkpoint_out`` (the ledger hashes and copies it).

The virtual clock. The driver is serial: while it decides, commits and writes reports, no epoch is submitted.
So whenever the driver calls :meth:`SimulatedExecutor.submit`, :meth:`~SimulatedExecutor.wait` or
:meth:`~SimulatedExecutor.close`, the real time it spent since the executor last returned to it is added to the
clock; :meth:`~SimulatedExecutor.wait` then jumps the clock to the next epoch end (if it is not already past
it) and returns every epoch that has ended. Time spent inside the executor (writing checkpoints, drawing
weights) stands for the workers' own work and is not counted.

Work the driver does in another thread (a surrogate refitting in the background) runs in real time, as on a
real cluster: while another thread of this process uses the CPU, a :meth:`~SimulatedExecutor.wait` lets the clock
pass in real time (sleeping in short steps) instead of jumping, so a background fit takes as long on the virtual
clock as it does for real, and epochs end meanwhile.

Utilisation is ``busy worker-seconds / (workers x makespan)``, the makespan running from :meth:`start` to
:meth:`close`; the per-worker busy intervals are kept (:attr:`SimulatedExecutor.intervals`).
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_fms.atomic import atomic_output
from lightning_fms.errors import FMSError
from lightning_fms.parallel.protocol import Finished
from lightning_fms.parallel.synthetic import LearningCurves
from lightning_fms.search.seeds import derive_seed
from lightning_fms.training.executor import EpochJob, EpochOutcome

__all__ = ["EpochTimes", "SimulatedExecutor", "SimulationStats", "ceiling_utilisation"]

_STEP_S = 0.005
"""Real seconds of one step of a wait that follows another thread's work."""
_PROBE_S = 0.001
"""Real seconds of a step that looks whether another thread works."""
_IDLE_PROBES = 2
"""Steps in a row without another thread's work after which a wait stops following and jumps."""


@dataclass(frozen=True)
class EpochTimes:
    """Epoch durations: lognormal with median ``median_s`` and log-standard deviation ``spread``.

    The duration of an attempt at ``(trial, epoch)`` derives from ``(seed, trial, epoch, attempt)`` only, so it
    does not depend on the order in which the driver submits. An epoch that trains a share ``f`` of its layer
    units (the frozen-layer fidelity) takes ``f`` times as long.

    Attributes:
        median_s: Median seconds of a full epoch.
        spread: Standard deviation of the log duration (0: every epoch takes ``median_s``).
    """

    median_s: float = 60.0
    spread: float = 0.3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.median_s) and self.median_s > 0):
            raise FMSError(f"median_s must be a positive number of seconds, got {self.median_s!r}")
        if not (math.isfinite(self.spread) and self.spread >= 0):
            raise FMSError(f"spread must be a finite number >= 0, got {self.spread!r}")

    def seconds(self, seed: int, trial_id: int, epoch: int, attempt: int = 0, fraction: float | None = None) -> float:
        """The duration of this attempt at ``epoch`` of ``trial_id``, in seconds."""
        draw = np.random.default_rng(derive_seed(seed, "epoch time", trial_id, epoch, attempt)).normal()
        return self.median_s * math.exp(self.spread * draw) * (1.0 if fraction is None else float(fraction))


@dataclass(frozen=True)
class SimulationStats:
    """How busy the simulated workers were.

    Attributes:
        workers: Simulated workers.
        epochs: Epochs trained (ended and returned, not lost).
        lost: Epochs lost with their worker.
        submitted: Jobs submitted (the driver's decisions that reached a worker).
        makespan_s: Virtual seconds from :meth:`SimulatedExecutor.start` to :meth:`SimulatedExecutor.close`
            (to the last call, before it is closed).
        busy_s: Worker-seconds spent on epochs (lost ones up to their loss).
        driver_s: Real seconds the driver spent between calls, all on the virtual clock.
        driver_calls: Calls of submit, wait and close.
        followed_s: Virtual seconds of waits that passed in real time while another thread worked (a background
            surrogate fit).
    """

    workers: int
    epochs: int
    lost: int
    submitted: int
    makespan_s: float
    busy_s: float
    driver_s: float
    driver_calls: int
    followed_s: float = 0.0

    @property
    def utilisation(self) -> float:
        """``busy_s / (workers * makespan_s)`` (``nan`` before anything ran)."""
        total = self.workers * self.makespan_s
        return self.busy_s / total if total > 0 else math.nan

    @property
    def decisions_per_s(self) -> float:
        """Submitted jobs per virtual second of the makespan."""
        return self.submitted / self.makespan_s if self.makespan_s > 0 else math.nan

    def to_dict(self) -> dict[str, float]:
        """The stats as plain data, with the derived utilisation and decision rate."""
        return {
            "workers": self.workers,
            "epochs": self.epochs,
            "lost": self.lost,
            "submitted": self.submitted,
            "makespan_s": self.makespan_s,
            "busy_s": self.busy_s,
            "utilisation": self.utilisation,
            "decisions_per_s": self.decisions_per_s,
            "driver_s": self.driver_s,
            "driver_calls": self.driver_calls,
            "followed_s": self.followed_s,
        }


@dataclass
class _Running:
    """An epoch on a simulated worker."""

    job: EpochJob
    worker: int
    start: float
    end: float
    lost: bool


class SimulatedExecutor:
    """A cluster of ``workers`` simulated workers on a virtual clock (see the module docstring); it never trains.

    Args:
        workers: How many epochs run at once.
        curves: The value (and weights) after each epoch of each configuration.
        epoch_times: The distribution of epoch durations.
        seed: Seeds the durations and losses (the values and weights are seeded by ``curves``).
        monitor: The metric the epochs report; a job naming another is refused (``None``: any).
        cap: The study's per-trial cap; a job with another is refused (``None``: any).
        modules: ``hub entry -> module`` with its pretrained weights (for example ``ModelHub.build``), what
            :meth:`pretrained_module` returns and the weights after an epoch start from; ``None``: no hub
            modules (a study that records weights is then refused).
        hub_key: The space's hub choice, read from a job's configuration for ``modules`` (``None``: no hub).
        loss_probability: Chance that an attempt's worker is lost mid-epoch (its epoch comes back lost).
        count_driver_time: Add the driver's time between calls to the clock (``False``: a driver that takes no
            time, the ceiling the epoch durations alone allow).
        follow_threads: While another thread of this process uses the CPU, waits pass in real time (see the
            module docstring); ``False``: waits always jump.
        mode: The driver's decision mode, read by the driver (``"async"`` or ``"sync"``).
        refit: The driver's refit policy, read by the driver (``"auto"``, ``"background"`` or ``"inline"``).
    """

    def __init__(
        self,
        workers: int,
        curves: LearningCurves,
        *,
        epoch_times: EpochTimes | None = None,
        seed: int = 0,
        monitor: str | None = None,
        cap: int | None = None,
        modules: Callable[[str], nn.Module] | None = None,
        hub_key: str | None = None,
        loss_probability: float = 0.0,
        count_driver_time: bool = True,
        follow_threads: bool = True,
        mode: str = "async",
        refit: str = "auto",
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise FMSError(f"workers must be an integer >= 1, got {workers!r}")
        if not 0.0 <= float(loss_probability) < 1.0:
            raise FMSError(f"loss_probability must be in [0, 1), got {loss_probability!r}")
        self._workers = workers
        self.curves = curves
        self.epoch_times = epoch_times if epoch_times is not None else EpochTimes()
        self.seed = int(seed)
        self.monitor = monitor
        self.cap = cap
        self.modules = modules
        self.hub_key = hub_key
        self.loss_probability = float(loss_probability)
        self.count_driver_time = bool(count_driver_time)
        self.follow_threads = bool(follow_threads)
        self.mode = mode
        self.refit = refit
        self.clock = 0.0
        self.followed_s = 0.0
        """Virtual seconds that passed in real time because another thread was working."""
        self.intervals: dict[str, list[tuple[float, float]]] = {self.label(i): [] for i in range(workers)}
        self.trained: Counter[tuple[int, int]] = Counter()
        self._free = list(range(workers))
        self._running: dict[int, _Running] = {}
        self._ends: list[tuple[float, int, int]] = []
        self._attempts: Counter[tuple[int, int]] = Counter()
        self._pretrained: dict[str, dict[str, torch.Tensor]] = {}
        self._submitted = 0
        self._lost = 0
        self._driver_s = 0.0
        self._driver_calls = 0
        self._returned: float | None = None
        self._started = False
        self._closed = False

    # ------------------------------------------------------------------ the clock
    def _enter(self) -> None:
        """The driver calls in: the real time it spent since the last return goes on the clock."""
        now = time.perf_counter()
        if self._returned is not None:
            spent = now - self._returned
            self._driver_s += spent
            if self.count_driver_time:
                self.clock += spent
        self._driver_calls += 1

    def _leave(self) -> None:
        self._returned = time.perf_counter()

    def _advance(self, target: float) -> None:
        """Move the clock to ``target``: in real time while another thread works, then at once.

        Another thread works when, over a short sleep of this one, the process used CPU time beyond this thread's;
        such a sleep moves the clock by its length. After a few short sleeps in a row without, the clock jumps (at
        once when this is the process's only thread).
        """
        idle, working = 0, False
        following = self.follow_threads and threading.active_count() > 1
        while following and self.clock < target and idle < _IDLE_PROBES:
            cpu, own, real = time.process_time(), time.thread_time(), time.perf_counter()
            time.sleep(min(_STEP_S if working else _PROBE_S, target - self.clock))
            elapsed = time.perf_counter() - real
            working = (time.process_time() - cpu) - (time.thread_time() - own) >= 0.1 * elapsed
            if not working:  # an idle step leaves the clock alone
                idle += 1
                continue
            idle = 0
            step = min(elapsed, target - self.clock)
            self.clock += step
            self.followed_s += step
        self.clock = max(self.clock, target)

    @staticmethod
    def label(worker: int) -> str:
        """The label of worker ``worker`` (0-based), as :meth:`submit` returns it."""
        return f"sim-w{worker}"

    # ------------------------------------------------------------------ the concurrent-executor protocol
    @property
    def workers(self) -> int:
        """How many epochs may run at once."""
        return self._workers

    def start(self) -> None:
        """Start the clock at 0 (idempotent)."""
        if self._closed:
            raise FMSError("the simulated cluster is closed")
        if not self._started:
            self._started = True
            self.clock = 0.0
            self._leave()

    def submit(self, job: EpochJob) -> str:
        """Put ``job`` on the lowest-numbered free worker at the current virtual time; returns its label.

        Raises:
            FMSError: not started or closed, every worker busy, the job's trial already running, a monitor or
                cap other than the cluster's, a resume checkpoint that is not the trial's previous epoch, or
                weights asked for without ``modules``.
        """
        if not self._started or self._closed:
            raise FMSError("start() the simulated cluster before submitting (and do not submit after close())")
        self._enter()
        try:
            self._check(job)
            worker = heapq.heappop(self._free)
            key = (job.trial_id, job.epoch)
            attempt = self._attempts[key]
            self._attempts[key] += 1
            duration = self.epoch_times.seconds(self.seed, job.trial_id, job.epoch, attempt, job.trainable_fraction)
            rng = np.random.default_rng(derive_seed(self.seed, "worker loss", job.trial_id, job.epoch, attempt))
            lost = bool(self.loss_probability > 0 and rng.random() < self.loss_probability)
            end = self.clock + (duration * rng.uniform(0.05, 0.95) if lost else duration)
            self._running[job.trial_id] = _Running(job, worker, self.clock, end, lost)
            heapq.heappush(self._ends, (end, self._submitted, job.trial_id))
            self._submitted += 1
            return self.label(worker)
        finally:
            self._leave()

    def _check(self, job: EpochJob) -> None:
        if self.monitor is not None and job.monitor != self.monitor:
            raise FMSError(f"the job monitors {job.monitor!r} but the simulated cluster reports {self.monitor!r}")
        if self.cap is not None and job.cap != self.cap:
            raise FMSError(f"the job's per-trial cap is {job.cap} but the simulated cluster was built for {self.cap}")
        if not self._free:
            raise FMSError(f"all {self._workers} simulated workers are busy; wait() before submitting more")
        if job.trial_id in self._running:
            raise FMSError(f"trial {job.trial_id} already has an epoch running")
        if job.record_weights and self._entry(job) is None:
            raise FMSError("the study records weights: give the simulated cluster modules= and hub_key=")
        if job.resume_from is not None:
            previous = _read_checkpoint(job.resume_from)
            if previous != (job.trial_id, job.epoch - 1):
                raise FMSError(
                    f"trial {job.trial_id} epoch {job.epoch} resumes from {job.resume_from}, which holds "
                    f"trial {previous[0]} epoch {previous[1]}"
                )

    def wait(self, timeout: float | None = None) -> list[Finished]:
        """Jump the clock to the next epoch end and return every epoch that has ended (none running: ``[]``).

        With ``timeout``, the clock moves at most ``timeout`` virtual seconds; ``[]`` if nothing ended by then.
        """
        self._enter()
        try:
            if not self._ends:
                return []
            next_end = self._ends[0][0]
            if timeout is not None and next_end > self.clock + max(0.0, float(timeout)):
                self._advance(self.clock + max(0.0, float(timeout)))
                return []
            self._advance(next_end)
            finished = []
            while self._ends and self._ends[0][0] <= self.clock:
                _, _, trial_id = heapq.heappop(self._ends)
                finished.append(self._finish(self._running.pop(trial_id)))
            return finished
        finally:
            self._leave()

    def _finish(self, run: _Running) -> Finished:
        """Free the worker, record its busy interval, and produce the epoch (or its loss)."""
        heapq.heappush(self._free, run.worker)
        label = self.label(run.worker)
        self.intervals[label].append((run.start, run.end))
        job = run.job
        if run.lost:
            self._lost += 1
            return Finished(job, label, lost=f"simulated worker {label} lost mid-epoch")
        value = self.curves.value(job.config, job.epoch)
        entry = self._entry(job)
        weights = self.curves.weights(job.config, job.epoch, self._pretrained_state(entry)) if entry else None
        with atomic_output(job.checkpoint_out) as tmp:
            torch.save(
                {"simulated": {"trial": job.trial_id, "epoch": job.epoch, "value": value}, "state_dict": {}}, tmp
            )
        self.trained[(job.trial_id, job.epoch)] += 1
        metrics = {job.monitor: value} if math.isfinite(value) else {}
        outcome = EpochOutcome(
            value=value,
            weights=weights if job.record_weights else None,
            wall_s=run.end - run.start,
            metrics=metrics,
        )
        return Finished(job, label, outcome=outcome)

    def close(self) -> None:
        """Stop the clock (idempotent); epochs still running are abandoned, busy up to now."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._enter()
        self._closed = True
        for run in self._running.values():
            self.intervals[self.label(run.worker)].append((run.start, min(run.end, self.clock)))
        self._running.clear()
        self._ends.clear()

    # ------------------------------------------------------------------ the one-epoch executor protocol
    def run_epoch(self, job: EpochJob) -> EpochOutcome:
        """Run one epoch on its own (nothing else may be running): submit, wait, return the outcome.

        Raises:
            FMSError: epochs are running, or as :meth:`submit`; a lost epoch is reported as failed.
        """
        if self._running:
            raise FMSError("run_epoch() needs an idle simulated cluster; use submit() and wait() alongside others")
        self.start()
        self.submit(job)
        (finished,) = self.wait()
        if finished.outcome is None:
            return EpochOutcome(error=finished.lost, wall_s=0.0)
        return finished.outcome

    def pretrained_module(self, entry: str | None) -> nn.Module | None:
        """A fresh copy of the hub entry's module from ``modules`` (``None`` without modules or entry)."""
        if self.modules is None or entry is None:
            return None
        return self.modules(str(entry))

    def frozen_layer_costs(
        self, configs: Sequence[dict[str, Any]], fractions: tuple[float, ...]
    ) -> list[tuple[float, ...]]:
        """A simulated epoch at fraction ``f`` costs ``f`` (and takes ``f`` times as long)."""
        return [tuple(float(f) for f in fractions) for _ in configs]

    # ------------------------------------------------------------------ measurements
    def stats(self) -> SimulationStats:
        """Utilisation, decision rate and driver time so far (see :class:`SimulationStats`)."""
        busy = sum(end - start for spans in self.intervals.values() for start, end in spans)
        busy += sum(min(r.end, self.clock) - r.start for r in self._running.values() if r.start < self.clock)
        return SimulationStats(
            workers=self._workers,
            epochs=sum(self.trained.values()),
            lost=self._lost,
            submitted=self._submitted,
            makespan_s=self.clock,
            busy_s=busy,
            driver_s=self._driver_s,
            driver_calls=self._driver_calls,
            followed_s=self.followed_s,
        )

    def ceiling(self) -> float:
        """:func:`ceiling_utilisation` of the epochs this cluster ran (their durations, in submission order)."""
        spans = sorted((start, end) for runs in self.intervals.values() for start, end in runs)
        return ceiling_utilisation(self._workers, [end - start for start, end in spans])

    @property
    def duplicates(self) -> list[tuple[int, int]]:
        """The ``(trial, epoch)`` pairs trained more than once (a correct driver leaves this empty)."""
        return sorted(key for key, count in self.trained.items() if count > 1)

    def _entry(self, job: EpochJob) -> str | None:
        if self.modules is None or self.hub_key is None or self.hub_key not in job.config:
            return None
        return str(job.config[self.hub_key])

    def _pretrained_state(self, entry: str) -> dict[str, torch.Tensor]:
        if entry not in self._pretrained:
            module = self.pretrained_module(entry)
            assert module is not None
            self._pretrained[entry] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return self._pretrained[entry]


def ceiling_utilisation(workers: int, durations: Sequence[float]) -> float:
    """The utilisation a driver that takes no time reaches: each epoch, in order, to the first free worker.

    What is left below 1 is the ramp-down: the last epochs end at different times and nothing is left to fill the
    workers that free first (and, with fewer epochs than workers, the workers never used).

    Args:
        workers: Workers.
        durations: Each epoch's seconds, in the order they are handed out.
    """
    if not durations:
        return math.nan
    free = [0.0] * workers
    for duration in durations:
        heapq.heapreplace(free, free[0] + float(duration))
    return float(sum(durations)) / (workers * max(free))


def _read_checkpoint(path: Any) -> tuple[int, int]:
    """``(trial, epoch)`` of a simulated checkpoint.

    Raises:
        FMSError: the file is missing or is not a simulated checkpoint.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        simulated = data["simulated"]
        return int(simulated["trial"]), int(simulated["epoch"])
    except (OSError, KeyError, TypeError, RuntimeError) as error:
        raise FMSError(f"{path} is not a simulated checkpoint ({type(error).__name__})") from None
