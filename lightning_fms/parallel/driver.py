"""The driver: the tuner's loop when its executor runs several epochs at once.

One driver process decides; the workers train. The loop, for a
:class:`~lightning_fms.parallel.protocol.ConcurrentExecutor` with ``W`` workers:

1. **fill**: while fewer than ``W`` epochs are in flight, claim one more
   (:meth:`~lightning_fms.search.optimizer.FreezeThawOptimizer.claim`), one decision after another, each seeing
   the epochs already in flight as pending rows (:mod:`lightning_fms.search.pending`); save the study state, which
   now lists them as *running*; then submit them;
2. **wait** for epochs to end;
3. **commit** each ended epoch through the study's ledger (the one commit path the in-process loop uses), or give
   it back when its worker was lost (the trial is paused again at its last committed checkpoint, or forgotten if it
   had trained nothing; an epoch lost :data:`MAX_LOSSES` times is recorded as failed). The epochs one wait returned
   are committed as one batch, with one state save (:meth:`~lightning_fms.study.ledger.StudyLedger.batch`).

Modes:

* ``"async"`` (the default, for throughput): a free worker gets a decision at once. Which epochs end first depends
  on timing, so a rerun may decide differently.
* ``"sync"``: submit a batch of ``W`` decisions, wait for all of them, commit them in decision order, decide the
  next batch. With the same seed a rerun makes the same decisions, and with one worker the study equals the
  in-process one epoch for epoch.

Fits never block the workers for long: in ``"async"`` mode with ``refit="auto"``, once a surrogate fit takes longer
than the time between two free workers (the median epoch divided by ``W``), decisions score with the latest fitted
surrogate while a copy refits in a background thread on the latest data; the copy is swapped in when it is done.

Each attempt writes its checkpoint under a versioned name (``epoch-<k>.d<decision>.ckpt``); the study state
references it only once the driver commits the epoch, so a worker that was cut off and finishes late cannot change
what the study holds. A driver killed with ``-9`` leaves claims in the state: the next run (it holds the study's
lock, so the old driver is gone) gives them all back and deletes the files no state references.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import statistics
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lightning_fms.errors import FMSError
from lightning_fms.parallel.protocol import ConcurrentExecutor, Finished
from lightning_fms.progress import StudyProgress
from lightning_fms.search.decision import Suggestion
from lightning_fms.search.optimizer import FreezeThawOptimizer
from lightning_fms.search.searcher import SurrogateSearcher
from lightning_fms.search.seeds import derive_seed
from lightning_fms.study.ledger import StudyLedger
from lightning_fms.training.executor import EpochJob, EpochOutcome

__all__ = [
    "DRIVER_MODES",
    "MAX_LOSSES",
    "REFIT_POLICIES",
    "REPORT_INTERVAL_S",
    "ConcurrentDriver",
    "StudyLoop",
    "check_driver_settings",
]

log = logging.getLogger(__name__)

#: Decision modes of the driver.
DRIVER_MODES: tuple[str, ...] = ("async", "sync")
#: When the driver refits the surrogate off the decision path: ``"auto"`` (once fits outlast the time between
#: free workers), ``"background"`` (always, after the first fit), ``"inline"`` (never: every decision refits).
REFIT_POLICIES: tuple[str, ...] = ("auto", "background", "inline")
#: An epoch whose worker was lost this many times is recorded as failed rather than given back again.
MAX_LOSSES = 3
#: With several workers the ledger rewrites the reports (trajectory.csv, results.json, study.json) at most every
#: this many seconds, unless it was given an interval; the state is still saved on every commit. Their cost grows
#: with the study and was the driver's largest at 256 simulated workers (docs/ray.md, "Scale: the central decider").
REPORT_INTERVAL_S = 10.0


def check_driver_settings(mode: str, refit: str) -> None:
    """Refuse an unknown decision mode or refit policy.

    Raises:
        FMSError: naming the bad value.
    """
    if mode not in DRIVER_MODES:
        raise FMSError(f"unknown decision mode {mode!r} (expected one of {', '.join(DRIVER_MODES)})")
    if refit not in REFIT_POLICIES:
        raise FMSError(f"unknown refit policy {refit!r} (expected one of {', '.join(REFIT_POLICIES)})")


class StudyLoop(Protocol):
    """What the driver needs of the study it drives (:class:`~lightning_fms.tuner.FMSTuner` is one)."""

    optimizer: FreezeThawOptimizer
    ledger: StudyLedger

    def best_label(self) -> str:
        """The best value so far, for the display."""
        ...

    def epoch_job(self, suggestion: Suggestion, checkpoint_out: Path | None = None) -> EpochJob:
        """The job that trains ``suggestion``, its checkpoint written to ``checkpoint_out``."""
        ...

    def commit_epoch(
        self,
        trial_id: int,
        epoch: int,
        outcome: EpochOutcome,
        *,
        worker: str | None = None,
        checkpoint: Path | None = None,
    ) -> None:
        """Commit an epoch through the ledger and tell the observers."""
        ...


@dataclass
class _InFlight:
    """An epoch submitted to a worker and not yet committed."""

    suggestion: Suggestion
    job: EpochJob
    worker: str


class ConcurrentDriver:
    """Keeps a concurrent executor's workers busy with one study's decisions (see the module docstring).

    Args:
        tuner: The tuner whose optimizer, ledger and observers the driver works with (its study lock held).
        executor: The concurrent executor.
        mode: ``"async"`` or ``"sync"`` (default: the executor's ``mode`` attribute, else ``"async"``).
        refit: One of :data:`REFIT_POLICIES` (default: the executor's ``refit`` attribute, else ``"auto"``);
            ignored in ``"sync"`` mode, where every decision refits (that is what makes it reproducible).
        poll_s: Longest wait for an epoch before the driver looks at its background fit again.
    """

    def __init__(
        self,
        tuner: StudyLoop,
        executor: ConcurrentExecutor,
        mode: str | None = None,
        refit: str | None = None,
        poll_s: float = 1.0,
    ) -> None:
        self.tuner = tuner
        self.executor = executor
        self.mode = mode if mode is not None else str(getattr(executor, "mode", "async"))
        self.refit = refit if refit is not None else str(getattr(executor, "refit", "auto"))
        check_driver_settings(self.mode, self.refit)
        self.poll_s = poll_s
        self.owner = {"driver": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self.in_flight: dict[int, _InFlight] = {}
        self.losses: dict[tuple[int, int], int] = {}
        self.background_fits = 0
        self._fit_pool: ThreadPoolExecutor | None = None
        self._fit_future: Future[Any] | None = None
        self._last_fit_s: float | None = None

    # ------------------------------------------------------------------ the loop
    def run(self, display: StudyProgress) -> None:
        """Run the study until the budget is spent (the tuner's :meth:`~lightning_fms.tuner.FMSTuner.run` calls it).

        Raises:
            FMSError: a set-up problem (raised by a worker); every epoch in flight is given back first.
        """
        optimizer = self.tuner.optimizer
        ledger = self.tuner.ledger
        if self.executor.workers > 1 and ledger.report_interval_s is None:
            ledger.report_interval_s = REPORT_INTERVAL_S
        self.executor.start()
        try:
            while True:
                self._adopt_background_fit(block=False)
                if self.mode == "async" or not self.in_flight:
                    self._fill()
                display.update(optimizer, self.tuner.best_label(), running=self.running_label())
                if not self.in_flight:
                    break
                ended = self._collect()
                with self.tuner.ledger.batch(optimizer):  # one state save for the epochs that ended together
                    for finished in sorted(ended, key=lambda f: self._decision_of(f)):
                        self._settle(finished)
                display.update(optimizer, self.tuner.best_label(), running=self.running_label())
        except BaseException:
            self._give_back_in_flight()
            raise
        finally:
            self._stop_background_fit()

    def _collect(self) -> list[Finished]:
        """The epochs that ended: in ``"sync"`` mode all of the batch in flight, else at least one."""
        ended: list[Finished] = []
        waiting = set(self.in_flight)
        while True:
            got = self.executor.wait(timeout=self.poll_s)
            ended.extend(got)
            waiting -= {f.job.trial_id for f in got}
            if self.mode == "async":
                if ended:
                    return ended
                self._adopt_background_fit(block=False)
                self._start_background_fit()
            elif not waiting:
                return ended

    def _decision_of(self, finished: Finished) -> int:
        flight = self.in_flight.get(finished.job.trial_id)
        return flight.suggestion.decision if flight is not None else -1

    # ------------------------------------------------------------------ claims
    def _fill(self) -> None:
        """Claim one epoch per free worker (one decision after another), save the state, then submit them."""
        optimizer = self.tuner.optimizer
        claimed: list[Suggestion] = []
        while len(self.in_flight) + len(claimed) < self.executor.workers:
            suggestion = optimizer.claim(self.owner, current_fit=self._decide_with_current_fit())
            if suggestion is None:
                break
            claimed.append(suggestion)
            self._note_fit_time()
        if not claimed:
            return
        self.tuner.ledger.save(optimizer)
        for suggestion in claimed:
            checkpoint = self.tuner.ledger.attempt_checkpoint_path(
                suggestion.trial_id, suggestion.epoch, suggestion.decision
            )
            job = self.tuner.epoch_job(suggestion, checkpoint)
            worker = self.executor.submit(job)
            self.in_flight[suggestion.trial_id] = _InFlight(suggestion, job, worker)
        self._start_background_fit()

    def _settle(self, finished: Finished) -> None:
        """Commit an ended epoch through the ledger, or give it back when its worker was lost."""
        trial_id = finished.job.trial_id
        flight = self.in_flight.pop(trial_id, None)
        if flight is None or flight.job.epoch != finished.job.epoch:
            log.warning("trial %d epoch %d ended but was not in flight; ignored", trial_id, finished.job.epoch)
            return
        optimizer, ledger = self.tuner.optimizer, self.tuner.ledger
        epoch = flight.job.epoch
        if finished.outcome is None:
            key = (trial_id, epoch)
            self.losses[key] = self.losses.get(key, 0) + 1
            if self.losses[key] < MAX_LOSSES:
                log.warning(
                    "trial %d epoch %d: worker %s lost (%s); the epoch is given back",
                    trial_id,
                    epoch,
                    finished.worker,
                    finished.lost,
                )
                optimizer.release(trial_id)
                finished.job.checkpoint_out.unlink(missing_ok=True)
                ledger.save(optimizer)
                return
            outcome = EpochOutcome(error=f"its worker was lost {MAX_LOSSES} times (last: {finished.lost})")
        else:
            outcome = finished.outcome
        self.tuner.commit_epoch(trial_id, epoch, outcome, worker=finished.worker, checkpoint=flight.job.checkpoint_out)

    def _give_back_in_flight(self) -> None:
        """On the way out (an error or an interrupt): give every epoch in flight back and save the state."""
        if not self.in_flight:
            return
        optimizer = self.tuner.optimizer
        for trial_id in list(self.in_flight):
            optimizer.release(trial_id)
        self.in_flight.clear()
        try:
            self.tuner.ledger.save(optimizer)
        except Exception as error:  # the next run gives the claims back anyway
            log.warning("could not save the study state while stopping: %s", error)

    def running_label(self) -> str:
        """What runs now, for the progress display: ``trial/epoch@worker`` per epoch in flight."""
        return ", ".join(
            f"t{t}/e{f.job.epoch}@{f.worker}" for t, f in sorted(self.in_flight.items(), key=lambda kv: kv[0])
        )

    # ------------------------------------------------------------------ fits off the decision path
    def _searcher(self) -> SurrogateSearcher | None:
        searcher = self.tuner.optimizer.searcher
        return searcher if isinstance(searcher, SurrogateSearcher) else None

    def _background_wanted(self) -> bool:
        """Whether decisions should use the latest fit while a copy refits (see the module docstring)."""
        searcher = self._searcher()
        if self.mode != "async" or self.refit == "inline" or searcher is None or not searcher.has_fit:
            return False
        if self.refit == "background":
            return True
        if self._last_fit_s is None:
            return False
        walls = [float(d.get("wall_s", 0.0)) for d in self.tuner.optimizer.decisions[-50:]]
        if not walls:
            return False
        return self._last_fit_s > statistics.median(walls) / max(1, self.executor.workers)

    def _decide_with_current_fit(self) -> bool:
        return self._background_wanted()

    def _note_fit_time(self) -> None:
        """Remember how long the last decision's fit took (decisions that refit record it)."""
        optimizer = self.tuner.optimizer
        newest = max(optimizer.running.values(), key=lambda c: c.decision.index, default=None)
        if newest is None:
            return
        info = dict(newest.decision.diagnostics)
        if "current_fit" not in info and float(info.get("surrogate_s", 0.0)) > 0:
            self._last_fit_s = float(info["surrogate_s"])

    def _start_background_fit(self) -> None:
        """Start refitting a copy of the surrogate on the latest data, unless one is running or none is wanted."""
        searcher = self._searcher()
        if searcher is None or self._fit_future is not None or not self._background_wanted():
            return
        optimizer = self.tuner.optimizer
        seed = derive_seed(optimizer.seed, "background fit", self.background_fits)
        plan = searcher.fit_plan(optimizer.selection_context(), seed)
        if plan is None:
            return
        if self._fit_pool is None:
            self._fit_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fms-refit")
        surrogate = copy.deepcopy(searcher.surrogate)
        started = time.perf_counter()

        def fit() -> tuple[Any, float]:
            return searcher.fit_surrogate(surrogate, plan), time.perf_counter() - started

        self._fit_future = self._fit_pool.submit(fit)

    def _adopt_background_fit(self, block: bool) -> None:
        """Swap in the background fit's surrogate once it is done (``block``: wait for it)."""
        future = self._fit_future
        searcher = self._searcher()
        if future is None or searcher is None or (not block and not future.done()):
            return
        self._fit_future = None
        try:
            surrogate, seconds = future.result()
        except Exception as error:  # a failed background fit leaves the current one in use
            log.warning("background surrogate fit failed: %s", error)
            return
        searcher.adopt(surrogate)
        self._last_fit_s = seconds
        self.background_fits += 1

    def _stop_background_fit(self) -> None:
        if self._fit_future is not None:
            self._fit_future.cancel()
            self._fit_future = None
        if self._fit_pool is not None:
            self._fit_pool.shutdown(wait=True, cancel_futures=True)
            self._fit_pool = None
