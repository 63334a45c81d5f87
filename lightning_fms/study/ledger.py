"""The study ledger: the one place where a trained epoch is committed to the study directory.

Whoever trains an epoch (the tuner's executor, or the user's script that ``lightning-fms agent`` runs) writes
its checkpoint to :meth:`StudyLedger.checkpoint_path`, a new file per epoch, never over an older one. Then
:meth:`StudyLedger.commit`, in this order:

1. records the outcome with the optimizer (``tell`` / ``complete``); on success it first keeps the epoch's
   weight snapshot (when the study records weights), copies the checkpoint to ``best.ckpt`` when the epoch
   beats the best so far, and references the checkpoint (path and sha256);
2. saves the study state, which now references the new checkpoint, atomically;
3. deletes the checkpoints the saved state no longer references;
4. rewrites ``trajectory.csv`` and ``results.json`` (and the state's readable copy ``study.json``), at most every
   :attr:`StudyLedger.report_interval_s` seconds (every commit by default); the state itself is saved on every
   commit, and the reports are always rewritten at the end (``write_reports(final=True)``).

Several epochs that end together may be committed as one batch (:meth:`StudyLedger.batch`): steps 1 for each,
then steps 2 to 4 once.

A kill before step 2 leaves the old state, whose checkpoints are all still on disk: on resume the epoch is
trained again (with the same seed, identically). A kill between steps 2 and 3 leaves checkpoints that no
state references; :meth:`StudyLedger.prune_orphans` deletes them when the study is resumed.

Checkpoint policy (what keeps disk use bounded): a paused trial keeps exactly one checkpoint, that of its
newest epoch. A trial that finishes (reaches the cap), fails, or is stopped by ``max_paused_trials`` loses
its checkpoint. ``best.ckpt`` is a copy of the checkpoint of the best epoch so far. So the study holds at
most ``paused trials + 1`` checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_fms.atomic import atomic_output, sha256_file
from lightning_fms.errors import CheckpointError
from lightning_fms.search.trial import TrialStatus, to_score
from lightning_fms.study.directory import StudyDirectory
from lightning_fms.study.reports import write_regret_plot, write_results, write_trajectory
from lightning_fms.study.view import StudyView

if TYPE_CHECKING:
    from lightning_fms.search.optimizer import FreezeThawOptimizer
    from lightning_fms.study.snapshots import WeightSnapshots
    from lightning_fms.training.executor import EpochOutcome

__all__ = ["BestEpoch", "CheckpointRef", "StudyLedger"]


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint the study state references.

    Attributes:
        path: Its path inside the study directory (``trials/<id>/epoch-<k>.ckpt``).
        sha256: Hex SHA-256 of its content when the study recorded it (``None``: not checked).
    """

    path: str
    sha256: str | None


@dataclass(frozen=True)
class BestEpoch:
    """The epoch whose checkpoint ``best.ckpt`` holds: ``value`` after ``epoch`` of ``trial``."""

    trial: int
    epoch: int
    value: float


class StudyLedger:
    """Commits epochs to a study directory and owns its checkpoint policy (see the module docstring).

    Args:
        study: The study directory.
        monitor: The optimised metric (named in ``results.json``).
        mode: ``"max"`` or ``"min"``.
        section: Key of the ledger's part of the study state, naming the front end that owns the study:
            ``"tuner"`` or ``"agent"``.
        settings: Stored in the ledger's part of the state (the agents' study settings); ``None``: nothing.
        families: Hub entry → architecture family, for the reports (empty without a hub).
        snapshots: Where the weights after each successful epoch are kept when the study records weights
            (``None``: it does not).
        report_interval_s: A commit rewrites the reports (``trajectory.csv``, ``results.json``, ``study.json``)
            only when this many seconds have passed since they were last written (``0``: every commit). Their
            cost grows with the study (they hold every epoch), so a driver that commits several epochs a second
            writes them every few seconds instead; between rewrites they lag the state by at most this long.
            ``None`` (the default): every commit, unless the driver of a concurrent executor sets an interval.
    """

    def __init__(
        self,
        study: StudyDirectory,
        *,
        monitor: str,
        mode: str,
        section: str = "tuner",
        settings: Mapping[str, Any] | None = None,
        families: Mapping[str, str] | None = None,
        snapshots: WeightSnapshots | None = None,
        report_interval_s: float | None = None,
    ) -> None:
        if report_interval_s is not None and not (math.isfinite(report_interval_s) and report_interval_s >= 0):
            raise ValueError(f"report_interval_s must be a finite number >= 0 or None, got {report_interval_s!r}")
        self.study = study
        self.monitor = monitor
        self.mode = mode
        self.section = section
        self.settings = dict(settings) if settings is not None else None
        self.families = dict(families or {})
        self.snapshots = snapshots
        self.checkpoints: dict[int, CheckpointRef] = {}
        self.best: BestEpoch | None = None
        self.report_interval_s = None if report_interval_s is None else float(report_interval_s)
        self._reports_written: float | None = None  # time.monotonic() of the last rewrite
        self._readable_stale = False  # study.json behind state.pt
        self._batch: set[int] | None = None  # inside batch(): the trials its commits touched
        self._batch_saves = False  # inside batch(): a save is due at its end

    # ------------------------------------------------------------------ paths
    def checkpoint_path(self, trial_id: int, epoch: int) -> Path:
        """Where the checkpoint after ``epoch`` of ``trial_id`` must be written before :meth:`commit`."""
        return self.study.trial_dir(trial_id) / f"epoch-{epoch}.ckpt"

    def attempt_checkpoint_path(self, trial_id: int, epoch: int, decision: int) -> Path:
        """A versioned checkpoint path for one attempt at ``epoch`` (decision ``decision``), for concurrent workers.

        An epoch given back (its worker lost) and trained again gets a new decision and so a new file: a worker
        that was only cut off and finishes late cannot overwrite the checkpoint the study committed.
        """
        return self.study.trial_dir(trial_id) / f"epoch-{epoch}.d{decision}.ckpt"

    def resume_checkpoint(self, trial_id: int) -> Path:
        """The checkpoint a paused trial resumes from, verified against the sha256 the study recorded.

        Raises:
            CheckpointError: the trial has none, it is missing, or its content changed.
        """
        ref = self.checkpoints.get(trial_id)
        if ref is None:
            raise CheckpointError(f"trial {trial_id} has no checkpoint to resume from")
        path = self.study.path / ref.path
        self.study.verify_checkpoint(path, ref.sha256)
        return path

    @property
    def best_checkpoint(self) -> Path | None:
        """``best.ckpt`` once an epoch succeeded, else ``None``."""
        return self.study.best_checkpoint_path if self.best is not None else None

    # ------------------------------------------------------------------ the commit
    def commit(
        self,
        optimizer: FreezeThawOptimizer,
        trial_id: int,
        epoch: int,
        outcome: EpochOutcome,
        *,
        claimed: bool = False,
        worker: str | None = None,
        checkpoint: Path | None = None,
    ) -> list[int]:
        """Commit a trained (or failed) epoch: record it, save the state, prune checkpoints, write the reports.

        Args:
            optimizer: The study's optimizer; the epoch is its pending suggestion (``ask``) or, with
                ``claimed``, one of its running ones (``claim``).
            trial_id: The trial.
            epoch: The epoch (its checkpoint is at :meth:`checkpoint_path` unless it failed).
            outcome: What the epoch produced (``value``, ``error``, ``wall_s``; ``weights`` when the study
                records weights).
            claimed: The epoch came from ``claim`` (several workers), not from ``ask``.
            worker: Who trained it (recorded in the decision log with a claimed epoch).
            checkpoint: Where its checkpoint was written, when not at :meth:`checkpoint_path` (a versioned name,
                :meth:`attempt_checkpoint_path`).

        Returns:
            The trials stopped by ``max_paused_trials`` (their checkpoints are gone).
        """
        if outcome.error is not None:
            stopped = _tell(optimizer, trial_id, epoch, outcome, claimed, worker)
            self.checkpoints.pop(trial_id, None)
        else:
            checkpoint = checkpoint if checkpoint is not None else self.checkpoint_path(trial_id, epoch)
            if self.snapshots is not None and outcome.weights is not None:
                self.snapshots.put(("trial", trial_id, epoch), outcome.weights)
            self._keep_if_best(checkpoint, trial_id, epoch, outcome.value)
            self.checkpoints[trial_id] = CheckpointRef(
                str(checkpoint.relative_to(self.study.path)), sha256_file(checkpoint)
            )
            stopped = _tell(optimizer, trial_id, epoch, outcome, claimed, worker)
            if optimizer.trials[trial_id].status != TrialStatus.PAUSED:
                self.checkpoints.pop(trial_id, None)
        for other in stopped:
            self.checkpoints.pop(other, None)
        if self._batch is not None:  # the batch saves once, at its end
            self._batch.update((trial_id, *stopped))
            self._batch_saves = True
            return stopped
        self._save_and_prune(optimizer, (trial_id, *stopped))
        return stopped

    def _save_and_prune(self, optimizer: FreezeThawOptimizer, touched: Iterable[int]) -> None:
        """Steps 2 to 4 of a commit: save the state, delete what it no longer references, rewrite the reports."""
        due = self._reports_due()
        self.save(optimizer, readable=due)
        for trial_id in touched:
            self._delete_unreferenced(trial_id)
        if due:
            self.write_reports(optimizer)

    @contextlib.contextmanager
    def batch(self, optimizer: FreezeThawOptimizer) -> Iterator[None]:
        """Commit several epochs with one state save (a group commit), e.g. the epochs that ended together.

        Inside the block, :meth:`commit` records each epoch (snapshot, ``best.ckpt``, the checkpoint reference, the
        optimizer) and :meth:`save` only notes that a save is due; at the end the state is saved once, then the
        checkpoints it no longer references are deleted and the reports are rewritten (when due). A kill inside the
        block leaves the state of before it, whose checkpoints are all still there: its epochs are trained again.
        The state's size grows with the study, so at several commits a second one save per batch instead of one per
        epoch is what keeps the driver ahead of the workers (docs/ray.md, "Scale: the central decider").
        """
        if self._batch is not None:  # nested: the outer block saves
            yield
            return
        self._batch, self._batch_saves = set(), False
        try:
            yield
        finally:
            touched, saves = self._batch, self._batch_saves
            self._batch, self._batch_saves = None, False
            if saves:
                self._save_and_prune(optimizer, sorted(touched))

    def _reports_due(self) -> bool:
        """Whether this commit rewrites the reports (see :attr:`report_interval_s`)."""
        if not self.report_interval_s or self._reports_written is None:
            return True
        return time.monotonic() - self._reports_written >= self.report_interval_s

    def _keep_if_best(self, checkpoint: Path, trial_id: int, epoch: int, value: float) -> None:
        """Copy ``checkpoint`` to ``best.ckpt`` when ``value`` beats the best so far."""
        if self.best is not None and to_score(value, self.mode) <= to_score(self.best.value, self.mode):
            return
        if not math.isfinite(value):
            return
        with atomic_output(self.study.best_checkpoint_path) as tmp:
            shutil.copyfile(checkpoint, tmp)
        self.best = BestEpoch(trial_id, epoch, value)

    # ------------------------------------------------------------------ pruning
    def _delete_unreferenced(self, trial_id: int) -> None:
        """Delete the trial's checkpoint files that the ledger does not reference."""
        trial_dir = self.study.trial_dir(trial_id)
        if not trial_dir.exists():
            return
        ref = self.checkpoints.get(trial_id)
        keep = self.study.path / ref.path if ref is not None else None
        for path in trial_dir.glob("*.ckpt"):
            if path != keep:
                path.unlink(missing_ok=True)

    def prune_orphans(self) -> None:
        """Delete every checkpoint the ledger does not reference (left by a process killed mid-commit).

        Only for a study this process holds alone (the tuner's): an agent's checkpoint may be written by
        another agent while this one looks.
        """
        trials_dir = self.study.path / "trials"
        if not trials_dir.exists():
            return
        for trial_dir in trials_dir.iterdir():
            if trial_dir.is_dir() and trial_dir.name.isdigit():
                self._delete_unreferenced(int(trial_dir.name))

    # ------------------------------------------------------------------ state and outputs
    def state_dict(self) -> dict[str, Any]:
        """The ledger's part of the study state: ``settings`` (if any), ``checkpoints`` and ``best``."""
        state: dict[str, Any] = {} if self.settings is None else {"settings": dict(self.settings)}
        state["checkpoints"] = {str(k): {"path": r.path, "sha256": r.sha256} for k, r in self.checkpoints.items()}
        best = self.best
        state["best"] = None if best is None else {"trial": best.trial, "epoch": best.epoch, "value": best.value}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the ``settings`` given to the constructor are kept)."""
        self.checkpoints = {
            int(k): CheckpointRef(str(v["path"]), v.get("sha256")) for k, v in state.get("checkpoints", {}).items()
        }
        best = state.get("best")
        self.best = None if best is None else BestEpoch(int(best["trial"]), int(best["epoch"]), float(best["value"]))

    def save(self, optimizer: FreezeThawOptimizer, readable: bool | None = None) -> None:
        """Save the study state: the optimizer's, with the ledger's part under :attr:`section`.

        Args:
            optimizer: The study's optimizer.
            readable: Also rewrite the readable ``study.json`` (else it is rewritten with the next reports);
                ``None``: when the reports are due (always, with :attr:`report_interval_s` 0).
        """
        if self._batch is not None:  # saved at the end of the batch
            self._batch_saves = True
            return
        readable = self._reports_due() if readable is None else readable
        self.study.save_state(self._full_state(optimizer), readable=readable)
        self._readable_stale = not readable

    def _full_state(self, optimizer: FreezeThawOptimizer) -> dict[str, Any]:
        state = optimizer.state_dict()
        state[self.section] = self.state_dict()
        return state

    def write_reports(self, optimizer: FreezeThawOptimizer, final: bool = False) -> None:
        """Rewrite ``trajectory.csv`` and ``results.json`` (and ``regret.png`` when ``final``).

        ``study.json`` is rewritten too when a throttled commit left it behind the state.
        """
        if self._readable_stale:
            self.study.save_readable(self._full_state(optimizer))
            self._readable_stale = False
        self._reports_written = time.monotonic()
        write_trajectory(self.study.path / "trajectory.csv", optimizer, self.families)
        write_results(
            self.study.path / "results.json",
            optimizer,
            best_checkpoint=self.best_checkpoint,
            monitor=self.monitor,
            families=self.families,
        )
        if final:
            write_regret_plot(self.study.path / "regret.png", optimizer, self.monitor)

    def view(self, optimizer: FreezeThawOptimizer) -> StudyView:
        """A read-only copy of the committed study, for observers."""
        return StudyView.of(
            optimizer,
            path=self.study.path,
            monitor=self.monitor,
            best_checkpoint=self.best_checkpoint,
            families=self.families,
        )


def _tell(
    optimizer: FreezeThawOptimizer,
    trial_id: int,
    epoch: int,
    outcome: EpochOutcome,
    claimed: bool,
    worker: str | None = None,
) -> list[int]:
    """Record the outcome with the optimizer, through ``complete`` for a claimed epoch, else ``tell``."""
    if claimed:
        return optimizer.complete(trial_id, epoch, outcome.value, outcome.wall_s, error=outcome.error, worker=worker)
    if outcome.error is not None:
        return optimizer.tell_failure(trial_id, epoch, outcome.error, outcome.wall_s)
    return optimizer.tell(trial_id, epoch, outcome.value, outcome.wall_s)
