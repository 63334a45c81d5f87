"""A read-only picture of a study, as committed: what observers (W&B logging, dashboards) are shown.

The view is a copy taken after an epoch was committed (or when the study starts or ends): changing it
changes nothing in the study, and it stays what it was when the study goes on.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from lightning_fms.study.reports import trajectory_rows

if TYPE_CHECKING:
    from lightning_fms.search.optimizer import FreezeThawOptimizer, Observation
    from lightning_fms.search.space import SearchSpace
    from lightning_fms.search.trial import Trial

__all__ = ["StudyView"]


@dataclass(frozen=True)
class StudyView:
    """What a study holds after its last committed epoch.

    Attributes:
        path: The study directory.
        space: The search space.
        monitor: The optimised metric.
        mode: ``"max"`` or ``"min"``.
        seed: The study's seed.
        budget: Total budget (full-epoch equivalents).
        max_epochs_per_trial: The per-trial epoch cap.
        trials: Every trial by id (copies).
        decisions: The decision log, one entry per trained epoch (the ``decisions`` of the study state).
        epochs_spent: Epochs trained so far.
        budget_spent: Budget spent so far (equals ``epochs_spent`` without the frozen-layer fidelity).
        best: The best recorded value (``None`` while nothing succeeded).
        best_checkpoint: ``best.ckpt`` once a best epoch exists.
        families: Hub entry → architecture family (empty without a hub).
    """

    path: Path
    space: SearchSpace
    monitor: str
    mode: str
    seed: int
    budget: int
    max_epochs_per_trial: int
    trials: Mapping[int, Trial]
    decisions: tuple[Mapping[str, Any], ...]
    epochs_spent: int
    budget_spent: float
    best: Observation | None
    best_checkpoint: Path | None
    families: Mapping[str, str]

    @classmethod
    def of(
        cls,
        optimizer: FreezeThawOptimizer,
        *,
        path: Path,
        monitor: str,
        best_checkpoint: Path | None,
        families: Mapping[str, str],
    ) -> StudyView:
        """A view of ``optimizer``'s committed study (copied: later epochs do not change it)."""
        return cls(
            path=path,
            space=optimizer.space,
            monitor=monitor,
            mode=optimizer.mode,
            seed=optimizer.seed,
            budget=optimizer.budget,
            max_epochs_per_trial=optimizer.cap,
            trials=MappingProxyType(copy.deepcopy(optimizer.trials)),
            decisions=tuple(MappingProxyType(dict(d)) for d in optimizer.decisions),
            epochs_spent=optimizer.epochs_spent,
            budget_spent=optimizer.budget_spent,
            best=optimizer.best(),
            best_checkpoint=best_checkpoint,
            families=MappingProxyType(dict(families)),
        )

    def trajectory(self) -> list[dict[str, Any]]:
        """One row per trained epoch (the rows of ``trajectory.csv``)."""
        return trajectory_rows(self, self.families)
