"""Study observers: hooks that see a study progress (W&B logging, dashboards, custom reports).

An observer only watches. It is called after each epoch is committed to the study state, so what it
sees is what a resumed study will also see.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_fms.search.trial import Trial
    from lightning_fms.tuner import FMSTuner


class StudyObserver:
    """Base class with no-op hooks; override the ones you need."""

    def on_study_start(self, tuner: FMSTuner) -> None:
        """Called once the study state is loaded (fresh or resumed), before the first decision."""

    def on_epoch_end(self, tuner: FMSTuner, trial: Trial, epoch: int, metrics: dict[str, float]) -> None:
        """Called after ``epoch`` of ``trial`` was trained and committed (``trial.status`` may be ``FAILED``).

        Args:
            tuner: The tuner (``tuner.optimizer`` holds every trial and decision).
            trial: The trial that trained.
            epoch: 1-based epoch number.
            metrics: Every scalar Lightning logged in that epoch (empty when the epoch failed).
        """

    def on_study_end(self, tuner: FMSTuner) -> None:
        """Called when the budget is spent (not when the study stops on an error)."""
