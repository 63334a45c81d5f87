"""Decisions: what the freeze-thaw optimizer chose for one epoch, from the choice to the record.

A :class:`Decision` is made when the optimizer chooses (``ask`` or ``claim``) and is recorded when the
epoch's outcome is told (``tell`` or ``complete``). It carries everything the budget and the decision log
need, typed: the trial, whether it starts or resumes, the epoch, the decision index, the trainable fraction
and the cost the epoch is charged. Between ``claim`` and ``complete`` it is persisted inside the study state
as a *running* record (:class:`ClaimedEpoch`), in the same plain-data form as before this type existed.

A :class:`Suggestion` is the part a caller sees: what to train.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["ClaimedEpoch", "Decision", "Suggestion", "SuggestionKind"]


class SuggestionKind(str, Enum):
    """What a suggestion asks for."""

    START = "start"
    RESUME = "resume"


@dataclass(frozen=True)
class Suggestion:
    """Train epoch ``epoch`` (1-based) of trial ``trial_id``, whose configuration is ``config``.

    ``kind`` is ``START`` for a trial's first epoch (from the hub entry's pretrained weights) and
    ``RESUME`` for a later one (from the trial's checkpoint after ``epoch - 1``).
    """

    kind: SuggestionKind
    trial_id: int
    config: dict[str, Any]
    epoch: int
    decision: int
    fraction: float = 1.0
    """Share of layer units to train in this epoch (< 1 only with the frozen-layer fidelity)."""


@dataclass(frozen=True)
class Decision:
    """One chosen epoch: train ``epoch`` of ``trial_id`` at ``fraction``, charged ``cost``.

    Attributes:
        index: The decision's 0-based index (it seeds the decision's fresh candidates and surrogate fit).
        trial_id: The trial (a new one for ``START``).
        kind: ``START`` (first epoch) or ``RESUME``.
        epoch: 1-based epoch.
        candidates: How many candidates were offered (``None``: not known, in records older than the count).
        fraction: Share of layer units trained (1 without the frozen-layer fidelity).
        cost: Full-epoch equivalents charged to the budget (1 without the frozen-layer fidelity).
        frozen_layers: Whether the frozen-layer fidelity chose ``fraction`` and ``cost`` (the decision log
            then holds ``trainable_fraction`` and ``cost``).
        diagnostics: How the searcher chose, for the decision log only (surrogate seconds, acquisition, ...),
            as ``(name, value)`` pairs in the searcher's order.
    """

    index: int
    trial_id: int
    kind: SuggestionKind
    epoch: int
    candidates: int | None = None
    fraction: float = 1.0
    cost: float = 1.0
    frozen_layers: bool = False
    diagnostics: tuple[tuple[str, Any], ...] = ()

    def suggestion(self, config: Mapping[str, Any]) -> Suggestion:
        """What the caller trains for this decision (``config``: the trial's configuration)."""
        return Suggestion(self.kind, self.trial_id, dict(config), self.epoch, self.index, self.fraction)

    def info(self) -> dict[str, Any]:
        """The decision's log fields after the outcome ones: candidates, diagnostics, fraction and cost."""
        info: dict[str, Any] = {} if self.candidates is None else {"candidates": self.candidates}
        info.update(self.diagnostics)
        if self.frozen_layers:
            info.update(trainable_fraction=self.fraction, cost=self.cost)
        return info

    def log_entry(self, value: float, epochs_spent: int, budget_spent: float, wall_s: float) -> dict[str, Any]:
        """The entry of the optimizer's decision log (``decisions`` in the state, trajectory.csv, results.json)."""
        return {
            "decision": self.index,
            "kind": self.kind.value,
            "trial": self.trial_id,
            "epoch": self.epoch,
            "value": value,
            "epochs_spent": epochs_spent,
            "budget_spent": budget_spent,
            "wall_s": float(wall_s),
            **self.info(),
        }

    @classmethod
    def from_record(cls, trial_id: int, kind: str, epoch: int, index: int, info: Mapping[str, Any]) -> Decision:
        """Inverse of :meth:`info` (with the fields stored beside it)."""
        info = dict(info)
        candidates = info.pop("candidates", None)
        frozen_layers = "trainable_fraction" in info
        fraction = float(info.pop("trainable_fraction", 1.0))
        cost = float(info.pop("cost", 1.0))
        return cls(
            index=int(index),
            trial_id=int(trial_id),
            kind=SuggestionKind(kind),
            epoch=int(epoch),
            candidates=None if candidates is None else int(candidates),
            fraction=fraction,
            cost=cost,
            frozen_layers=frozen_layers,
            diagnostics=tuple(info.items()),
        )


@dataclass(frozen=True)
class ClaimedEpoch:
    """A decision handed to a worker by ``claim`` and not yet completed (persisted as a *running* record).

    Attributes:
        decision: The decision.
        owner: Who trains it (e.g. ``{"host", "pid", "started"}``), to give it back if that worker dies.
    """

    decision: Decision
    owner: Mapping[str, Any]

    def to_record(self) -> dict[str, Any]:
        """Plain-data form stored under ``running`` in the study state."""
        decision = self.decision
        return {
            "kind": decision.kind.value,
            "epoch": decision.epoch,
            "decision": decision.index,
            "info": decision.info(),
            "owner": dict(self.owner),
        }

    @classmethod
    def from_record(cls, trial_id: int, record: Mapping[str, Any]) -> ClaimedEpoch:
        """Inverse of :meth:`to_record`."""
        decision = Decision.from_record(
            trial_id, record["kind"], record["epoch"], record["decision"], record.get("info", {})
        )
        return cls(decision, dict(record.get("owner", {})))
