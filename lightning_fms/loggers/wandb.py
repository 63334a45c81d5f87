"""W&B logging of a study: one run for the study, one run per trial, all in one group.

The layout is the one W&B's sweep pages read:

* **trial runs** (``job_type="trial"``, named ``<group>-trial-<id>``): the trial's configuration (every
  search-space key, the hub choice included, plus ``trial``) as the run config, and every scalar Lightning
  logged in each epoch the trial trained, against ``epoch`` (``define_metric("*", step_metric="epoch")``).
  The summary holds the last values, ``best_<monitor>``, ``epochs`` and ``status``. Parallel coordinates
  and parameter importance read the config and the summary, as for a sweep's runs.
* **the study run** (``job_type="study"``, named ``<group>-study``): per trained epoch ``best_so_far`` (the
  best monitored value so far), ``value``, ``trial`` and ``epoch`` against ``epochs_spent``
  (``define_metric("*", step_metric="epochs_spent")``); at the end, ``regret`` (``|best_final -
  best_so_far|``, in the metric's units: the gap to the best value the study found, as in ``regret.png``)
  and ``regret_normalised`` (the same divided by the regret after the first epoch, so it runs from 1 to 0)
  for every epoch spent, a ``regret_plot`` line plot and a ``trials`` table. Regret needs the final best, so
  it is logged when the budget is spent, not while the study runs.

Runs stay open while the study runs in this process: a trial that is paused and resumed keeps logging into
its own run. W&B cannot resume an offline run in another process (it writes a duplicate run), so after a
crash and a restart the study run and every trial that trains again start **new** runs with the same names:
the new study run replays the whole trajectory, a resumed trial's new run replays its earlier monitored
values (``resumed_at_epoch`` in its config says from where on the other metrics are present).

``wandb`` is imported when the logger is constructed; without it the constructor raises
:class:`~lightning_fms.errors.FMSError` saying what to install.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning_fms.errors import FMSError
from lightning_fms.observer import StudyObserver
from lightning_fms.search.trial import TrialStatus, to_score

if TYPE_CHECKING:
    from lightning_fms.search.trial import Trial
    from lightning_fms.study.view import StudyView

__all__ = ["INSTALL_HINT", "WandbStudyLogger", "wandb_available"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'lightning_fms[wandb]'"
_MODES = ("online", "offline", "disabled")
_OPEN = (TrialStatus.PAUSED, TrialStatus.RUNNING)


def wandb_available() -> bool:
    """Whether ``wandb`` can be imported (without importing it)."""
    return importlib.util.find_spec("wandb") is not None


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise FMSError(f"W&B logging needs the wandb package: {INSTALL_HINT}") from None
    return wandb


class WandbStudyLogger(StudyObserver):
    """Log a study to Weights & Biases (see the module docstring for what each run holds).

    Args:
        project: W&B project (``None``: W&B's default, e.g. ``WANDB_PROJECT``).
        entity: W&B entity, a user or team (``None``: the default entity).
        group: Group of the study's runs (``None``: the study directory's name).
        mode: ``"online"``, ``"offline"`` or ``"disabled"`` (``None``: W&B's default, e.g. ``WANDB_MODE``).
        dir: Folder under which W&B writes its local files (``None``: ``WANDB_DIR`` when set, else the
            study directory).
        tags: Tags of every run.
        log_trials: Create one run per trial (``False``: only the study run).

    Raises:
        FMSError: ``wandb`` is not installed, or ``mode`` is not one of W&B's modes.

    Example::

        tuner = FMSTuner(..., observers=[WandbStudyLogger(project="fms", mode="offline")])
    """

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        mode: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        tags: Sequence[str] | None = None,
        log_trials: bool = True,
    ) -> None:
        if mode is not None and mode not in _MODES:
            raise FMSError(f"wandb mode must be one of {', '.join(_MODES)}, got {mode!r}")
        self.wandb = _import_wandb()
        self.project = project
        self.entity = entity
        self.group = group
        self.mode = mode
        self.dir = None if dir is None else os.fspath(dir)
        self.tags = list(tags) if tags else None
        self.log_trials = log_trials
        self.study_run: Any = None
        self.trial_runs: dict[int, Any] = {}
        self._group = group or ""
        self._monitor = ""
        self._mode = "max"
        self._failed_once = False

    # ------------------------------------------------------------------ runs
    def _init(self, study: StudyView, **kwargs: Any) -> Any:
        # always explicit: wandb caches its settings (WANDB_DIR included) at the first init of the process
        directory = self.dir or os.environ.get("WANDB_DIR") or str(study.path)
        os.makedirs(directory, exist_ok=True)
        return self.wandb.init(
            project=self.project,
            entity=self.entity,
            group=self._group,
            mode=self.mode,
            dir=directory,
            tags=self.tags,
            reinit="create_new",
            **kwargs,
        )

    def _trial_run(self, study: StudyView, trial: Trial, epoch: int) -> Any:
        run = self.trial_runs.get(trial.id)
        if run is not None:
            return run
        config: dict[str, Any] = {**trial.config, "trial": trial.id}
        if epoch > 1:
            config["resumed_at_epoch"] = epoch
        run = self._init(study, job_type="trial", name=f"{self._group}-trial-{trial.id}", config=config)
        run.define_metric("epoch")
        run.define_metric("*", step_metric="epoch")
        for earlier, value in enumerate(trial.values[: epoch - 1], start=1):  # a trial resumed in a new process
            run.log({"epoch": earlier, self._monitor: value})
        self.trial_runs[trial.id] = run
        return run

    def close(self, study: StudyView | None = None) -> None:
        """Finish every open run (trial runs first); called by :meth:`on_study_end`."""
        for trial_id in list(self.trial_runs):
            failed = study is not None and study.trials[trial_id].status == TrialStatus.FAILED
            self.trial_runs.pop(trial_id).finish(exit_code=1 if failed else 0)
        if self.study_run is not None:
            self.study_run.finish()
            self.study_run = None

    # ------------------------------------------------------------------ observer hooks
    def on_study_start(self, study: StudyView) -> None:
        """Open the study run and replay what a resumed study already recorded."""
        self.close()
        self._group = self.group or study.path.resolve().name
        self._monitor, self._mode = study.monitor, study.mode
        config = {
            "monitor": study.monitor,
            "mode": study.mode,
            "budget": study.budget,
            "max_epochs_per_trial": study.max_epochs_per_trial,
            "seed": study.seed,
            "space": study.space.to_dict(),
            "study_dir": str(study.path.resolve()),
        }
        self.study_run = self._init(study, job_type="study", name=f"{self._group}-study", config=config)
        self.study_run.define_metric("epochs_spent")
        self.study_run.define_metric("*", step_metric="epochs_spent")
        for row in study.trajectory():
            self.study_run.log(_study_row(row))

    def on_epoch_end(self, study: StudyView, trial: Trial, epoch: int, metrics: dict[str, float]) -> None:
        """Log the epoch to the study run and to the trial's run; finish the runs of trials that ended."""
        try:
            self._log_epoch(study, trial, epoch, metrics)
        except Exception as error:  # an observer only watches: W&B trouble must not stop the study
            if not self._failed_once:
                log.warning("W&B logging failed (the study goes on): %s: %s", type(error).__name__, error)
                self._failed_once = True

    def _log_epoch(self, study: StudyView, trial: Trial, epoch: int, metrics: dict[str, float]) -> None:
        rows = study.trajectory()
        if self.study_run is not None and rows:
            self.study_run.log(_study_row(rows[-1]))
        if self.log_trials:
            run = self._trial_run(study, trial, epoch)
            succeeded = trial.status != TrialStatus.FAILED and len(trial.values) >= epoch
            record: dict[str, Any] = {k: v for k, v in metrics.items() if k not in ("epoch", "trial")}
            record["epoch"] = epoch
            if succeeded:
                record[self._monitor] = trial.values[epoch - 1]
            else:
                record["failed"] = 1
            run.log(record)
            scores = [to_score(v, self._mode) for v in trial.values]
            if scores and max(scores) > -math.inf:
                run.summary[f"best_{self._monitor}"] = trial.values[max(range(len(scores)), key=scores.__getitem__)]
            run.summary["epochs"] = trial.epochs
            run.summary["status"] = trial.status.value
            if trial.error:
                run.summary["error"] = trial.error
        for trial_id in list(self.trial_runs):
            status = study.trials[trial_id].status
            if status not in _OPEN:
                run = self.trial_runs.pop(trial_id)
                run.summary["status"] = status.value
                run.finish(exit_code=1 if status == TrialStatus.FAILED else 0)

    def on_study_end(self, study: StudyView) -> None:
        """Log the regret curve, the regret plot, the trials table and the best trial; finish every run."""
        try:
            if self.study_run is not None:
                self._log_summary(study)
        finally:
            self.close(study)

    def _log_summary(self, study: StudyView) -> None:
        wandb, run = self.wandb, self.study_run
        rows = [r for r in study.trajectory() if math.isfinite(r["best_so_far"])]
        curve = []
        if rows:
            final = rows[-1]["best_so_far"]
            first = abs(final - rows[0]["best_so_far"])
            for row in rows:
                regret = abs(final - row["best_so_far"])
                curve.append([row["epochs_spent"], row["best_so_far"], regret, regret / first if first > 0 else 0.0])
        for x, _, regret, normalised in curve:
            run.log({"epochs_spent": x, "regret": regret, "regret_normalised": normalised})
        regret_table = wandb.Table(columns=["epochs_spent", "best_so_far", "regret", "regret_normalised"], data=curve)
        keys = list(study.space)
        trial_columns = ["trial", "status", "epochs", f"best_{self._monitor}", f"last_{self._monitor}", *keys, "error"]
        trial_rows = []
        for trial in study.trials.values():
            scores = [to_score(v, self._mode) for v in trial.values]
            best = trial.values[max(range(len(scores)), key=scores.__getitem__)] if scores else None
            last = trial.values[-1] if trial.values else None
            values = [_table_value(trial.config.get(k)) for k in keys]
            trial_rows.append([trial.id, trial.status.value, trial.epochs, best, last, *values, trial.error or ""])
        run.log(
            {
                "epochs_spent": study.epochs_spent,
                "regret_plot": wandb.plot.line(
                    regret_table, "epochs_spent", "regret", title=f"regret to the best {self._monitor} found"
                ),
                "trials": wandb.Table(columns=trial_columns, data=trial_rows),
            }
        )
        best = study.best
        run.summary["epochs_spent"] = study.epochs_spent
        run.summary["trials_started"] = len(study.trials)
        if best is not None:
            run.summary["best_value"] = best.value
            run.summary["best_trial"] = best.trial_id
            run.summary["best_epoch"] = best.epoch
            run.summary["best_config"] = dict(study.trials[best.trial_id].config)


def _study_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {"epochs_spent": row["epochs_spent"], "trial": row["trial"], "epoch": row["epoch"]}
    if math.isfinite(row["value"]):
        out["value"] = row["value"]
    if math.isfinite(row["best_so_far"]):
        out["best_so_far"] = row["best_so_far"]
    return out


def _table_value(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
