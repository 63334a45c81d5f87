"""Trials: one configuration, its learning curve, and where it stands."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class TrialStatus(str, Enum):
    """Where a trial stands.

    * ``RUNNING``: an epoch of it is in flight (only between ``ask`` and ``tell``).
    * ``PAUSED``: it can be resumed for another epoch.
    * ``FINISHED``: it reached the per-trial epoch cap.
    * ``FAILED``: training raised, or the metric was missing or not finite; never resumed.
    * ``STOPPED``: its checkpoint was pruned to bound disk use; never resumed.
    """

    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class Trial:
    """A configuration and what training it showed.

    Attributes:
        id: 0-based trial number, in the order trials were started.
        config: Parameter name → value.
        values: The monitored metric after each trained epoch (``values[k-1]`` is epoch ``k``).
        status: See :class:`TrialStatus`.
        error: Why the trial failed, if it did.
        wall_s: Seconds each epoch took, training and checkpointing included.
        fractions: Trainable fraction of layer units in each epoch (empty: every epoch trained everything).
    """

    id: int
    config: dict[str, Any]
    values: list[float] = field(default_factory=list)
    status: TrialStatus = TrialStatus.RUNNING
    error: str | None = None
    wall_s: list[float] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)

    def fraction_of(self, epoch: int) -> float:
        """Trainable fraction of epoch ``epoch`` (1-based); 1 when not recorded."""
        return self.fractions[epoch - 1] if 0 < epoch <= len(self.fractions) else 1.0

    @property
    def last_fraction(self) -> float:
        """Trainable fraction of the last trained epoch (1 when none was recorded)."""
        return self.fractions[-1] if self.fractions else 1.0

    @property
    def epochs(self) -> int:
        """Epochs with a recorded value."""
        return len(self.values)

    @property
    def is_resumable(self) -> bool:
        """Whether the trial may get another epoch."""
        return self.status == TrialStatus.PAUSED

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (lists, dicts, scalars) for persistence."""
        return {
            "id": self.id,
            "config": dict(self.config),
            "values": [float(v) for v in self.values],
            "status": self.status.value,
            "error": self.error,
            "wall_s": [float(v) for v in self.wall_s],
            **({"fractions": [float(v) for v in self.fractions]} if self.fractions else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        """Inverse of :meth:`to_dict`."""
        return cls(
            id=int(data["id"]),
            config=dict(data["config"]),
            values=[float(v) for v in data["values"]],
            status=TrialStatus(data["status"]),
            error=data.get("error"),
            wall_s=[float(v) for v in data.get("wall_s", [])],
            fractions=[float(v) for v in data.get("fractions", [])],
        )


def to_score(value: float, mode: str) -> float:
    """Larger-is-better form of a metric value (``mode`` is ``"max"`` or ``"min"``)."""
    if not math.isfinite(value):
        return -math.inf
    return value if mode == "max" else -value


def config_key(config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """Hashable identity of a configuration: its items as ``(name, repr(value))``, sorted by name."""
    return tuple(sorted((k, repr(v)) for k, v in config.items()))
