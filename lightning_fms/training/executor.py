"""The executor protocol: where one epoch of one trial runs.

The tuner talks to this seam only, so where an epoch runs (this process, a Ray worker, ...) does not change
the tuner. An executor is anything with the three methods of :class:`Executor`; it need not subclass it.
Everything one epoch needs travels on its :class:`EpochJob` (the metric to record and the trial's epoch cap
included), and everything it produced comes back as an :class:`EpochOutcome`, so an executor holds no
per-epoch state that the tuner sets.

:class:`~lightning_fms.training.in_process.InProcessExecutor` runs epochs with Lightning Trainers in this
process; :class:`lightning_fms.testing.executors.ExecutorContract` is the test suite every executor passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class EpochJob:
    """Train epoch ``epoch`` of trial ``trial_id`` with ``config``, starting from ``resume_from``.

    Attributes:
        trial_id: The trial (its initialisation and data order derive from ``seed`` and this id).
        config: The trial's configuration (a point of the search space).
        epoch: The 1-based epoch to train; with ``resume_from=None`` epochs ``1..epoch`` train in one run.
        resume_from: Checkpoint of the trial's previous epoch, ``None`` to start from the pretrained weights.
        checkpoint_out: Where to write the checkpoint after the epoch (only when it succeeds).
        log_dir: The trial's folder (logs, the trial's own files).
        seed: The study's seed.
        monitor: The metric the study optimises: :attr:`EpochOutcome.value` is its value after the epoch.
        cap: The study's per-trial epoch cap, the horizon of the trial's LR schedule (the trial builder passes
            it to the module, e.g. as ``max_epochs``); ``epoch`` is at most ``cap``.
        trainable_fraction: Share of layer units trained in this epoch (the frozen-layer fidelity);
            ``None``: no layer is frozen.
        record_weights: Return the weights after the epoch in :attr:`EpochOutcome.weights` (the tuner asks
            for them when its featurizer reads weights).
    """

    trial_id: int
    config: dict[str, Any]
    epoch: int
    resume_from: Path | None
    checkpoint_out: Path
    log_dir: Path
    seed: int
    monitor: str
    cap: int
    trainable_fraction: float | None = None
    record_weights: bool = False


@dataclass
class EpochOutcome:
    """What an epoch produced. ``error`` set means the trial failed (the study goes on).

    Attributes:
        value: The job's monitored metric after the epoch (``nan`` when it failed).
        weights: CPU ``state_dict`` of the network the featurizer reads (keys of
            :meth:`Executor.pretrained_module`'s module), when the job asked for them.
        error: Why the epoch failed, one line; ``None`` when it succeeded and its checkpoint was written.
        wall_s: Seconds the epoch took.
        metrics: Every scalar metric logged in the epoch.
    """

    value: float = math.nan
    weights: dict[str, torch.Tensor] | None = None
    error: str | None = None
    wall_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Executor(Protocol):
    """Runs a study's epochs; what :class:`~lightning_fms.tuner.FMSTuner` calls.

    Error contract: a problem with the user's set-up that no other trial would escape (bad arguments, the
    monitored metric never logged, a job whose monitor or cap contradicts how the executor was built) raises
    :class:`~lightning_fms.errors.FMSError` and stops the study; anything else that goes wrong while training
    is returned as :attr:`EpochOutcome.error`.
    """

    def run_epoch(self, job: EpochJob) -> EpochOutcome:
        """Train ``job.epoch`` of the job's trial and write ``job.checkpoint_out`` when it succeeds.

        The checkpoint must load with ``torch.load(..., weights_only=True)`` and resume exactly: a job
        resumed from it continues as if the epochs had run in one fit.

        Raises:
            FMSError: a set-up problem (the study must stop).
        """
        ...

    def pretrained_module(self, entry: str | None) -> nn.Module | None:
        """A fresh copy of hub entry ``entry``'s network with its pretrained weights (``None`` without a hub).

        Its ``state_dict`` has the keys of :attr:`EpochOutcome.weights`, so recorded weights load into it.
        """
        ...

    def frozen_layer_costs(
        self, configs: Sequence[dict[str, Any]], fractions: tuple[float, ...]
    ) -> list[tuple[float, ...]]:
        """The cost of one epoch at each trainable fraction, per configuration's architecture.

        See :func:`lightning_fms.frozen.costs.fraction_costs` (costs relative to a full epoch).
        """
        ...
