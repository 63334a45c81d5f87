"""Study observers: hooks that see a study progress (W&B logging, dashboards, custom reports).

An observer only watches. Each hook receives a :class:`~lightning_fms.study.view.StudyView`, a read-only
copy of the study as committed: its trials, decisions, epochs and budget spent, best value, space,
monitor and mode, directory and hub families. ``on_epoch_end`` is called after each epoch is committed to
the study state, so what it sees is what a resumed study will also see.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_fms.study.view import StudyView

if TYPE_CHECKING:
    from lightning_fms.search.trial import Trial

__all__ = ["StudyObserver", "StudyView"]


class StudyObserver:
    """Base class with no-op hooks; override the ones you need."""

    def on_study_start(self, study: StudyView) -> None:
        """Called once the study state is loaded (fresh or resumed), before the first decision."""

    def on_epoch_end(self, study: StudyView, trial: Trial, epoch: int, metrics: dict[str, float]) -> None:
        """Called after ``epoch`` of ``trial`` was trained and committed (``trial.status`` may be ``FAILED``).

        Args:
            study: The study after this epoch (``study.trials`` holds every trial, ``study.decisions`` every
                decision).
            trial: The trial that trained (as in ``study.trials``).
            epoch: 1-based epoch number.
            metrics: Every scalar Lightning logged in that epoch (empty when the epoch failed).
        """

    def on_study_end(self, study: StudyView) -> None:
        """Called when the budget is spent (not when the study stops on an error)."""
