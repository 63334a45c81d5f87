"""FMSCheckpointCallback: streams each epoch's monitored value and weights out of a Lightning run.

The callback observes and signals; it never decides. At ``on_validation_end`` (after the validation
loop has reduced its metrics, unlike ``on_validation_epoch_end``, which sees the previous epoch's value
for metrics logged in the module's own ``on_validation_epoch_end``) it reads the monitored metric and
copies the weights to the CPU, hands both to a sink, and stops the Trainer once the epoch the tuner
paid for is done.

Under ``lightning-fms agent`` (the environment holds ``LIGHTNING_FMS_STUDY_DIR``) a callback built with
no arguments takes the metric, the epoch to stop after and where to write from the environment; when the
run ends it saves the trial checkpoint (atomically), the weights the study's featurizer reads (a safetensors
file, when the study records weights) and the result JSON the agent reads. It also seeds the run as the
in-process executor seeds a trial (:mod:`lightning_fms.training.seeder`): the global generators when it is
built, and the data order and the per-epoch generators as a :class:`~lightning_fms.training.seeder.TrialSeeder`,
so the epoch the user's script trains is the epoch ``lightning-fms tune`` would train.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from safetensors.torch import save_file
from typing_extensions import override

from lightning_fms.atomic import atomic_output, atomic_write_text, replace_atomically, temporary_path
from lightning_fms.search.seeds import seed_everything_quietly
from lightning_fms.training.seeder import TrialSeeder, initial_seed, trial_seed

ENV_STUDY_DIR = "LIGHTNING_FMS_STUDY_DIR"
ENV_TRIAL = "LIGHTNING_FMS_TRIAL"
ENV_EPOCH = "LIGHTNING_FMS_EPOCH"
ENV_RESUME = "LIGHTNING_FMS_RESUME"
ENV_RESULT = "LIGHTNING_FMS_RESULT"
ENV_MONITOR = "LIGHTNING_FMS_MONITOR"
ENV_CHECKPOINT = "LIGHTNING_FMS_CHECKPOINT"
ENV_SEED = "LIGHTNING_FMS_SEED"
ENV_WEIGHTS = "LIGHTNING_FMS_WEIGHTS"
ENV_WEIGHTS_ATTRIBUTE = "LIGHTNING_FMS_WEIGHTS_ATTRIBUTE"
#: Every variable ``lightning-fms agent`` sets for its command (all but the study directory may be empty).
AGENT_VARIABLES = (
    ENV_STUDY_DIR,
    ENV_TRIAL,
    ENV_EPOCH,
    ENV_RESUME,
    ENV_RESULT,
    ENV_MONITOR,
    ENV_CHECKPOINT,
    ENV_SEED,
    ENV_WEIGHTS,
    ENV_WEIGHTS_ATTRIBUTE,
)


@dataclass
class EpochReport:
    """What one trained epoch produced.

    Attributes:
        epoch: 1-based number of the epoch just trained.
        value: The monitored metric (``nan`` when it was not finite).
        weights: CPU copy of the watched module's ``state_dict``, or ``None`` when not recorded.
        error: Why the epoch does not count (metric missing or not finite), else ``None``.
        available_metrics: Names Lightning had in ``callback_metrics`` (for error messages).
    """

    epoch: int
    value: float
    weights: dict[str, torch.Tensor] | None = None
    error: str | None = None
    available_metrics: list[str] = field(default_factory=list)


class FMSCheckpointCallback(Callback):
    """Record the monitored value and the weights after every validation, and stop where told.

    Under ``lightning-fms agent`` it also seeds the run as the in-process executor seeds the trial: when it is
    built (build it before the module, as LightningCLI does, so fresh layers get the trial's initial seed) and in
    training (data order and per-epoch generators, as :class:`~lightning_fms.training.seeder.TrialSeeder`).

    Args:
        monitor: Name of the logged metric to record (for example ``"val_acc"``); may be left out under
            ``lightning-fms agent``, which names it in ``LIGHTNING_FMS_MONITOR``.
        weights_attribute: Dotted name of the submodule whose weights are recorded (for example
            ``"net"``, the pretrained hub module); ``""`` records the whole LightningModule; ``None``
            records no weights (under the agent: the submodule it names, when the study records weights).
        stop_after_epoch: Set ``trainer.should_stop`` once this many epochs (1-based) are done;
            ``None`` never stops the run (under the agent: the epoch it paid for).
        sink: Called with an :class:`EpochReport` after each validation (on global rank zero).

    Example::

        trainer = Trainer(callbacks=[FMSCheckpointCallback(monitor="val_acc")])

        # in a script run by ``lightning-fms agent``: everything comes from the environment
        trainer = Trainer(callbacks=[FMSCheckpointCallback()])

    Raises:
        ValueError: no ``monitor`` and not run by the agent.
    """

    def __init__(
        self,
        monitor: str | None = None,
        weights_attribute: str | None = "",
        stop_after_epoch: int | None = None,
        sink: Callable[[EpochReport], None] | None = None,
    ) -> None:
        self.agent_env = _agent_environment()
        self.seeder: TrialSeeder | None = None
        self.weights_error: str | None = None
        if self.agent_env is not None:
            env = self.agent_env
            monitor = monitor or env[ENV_MONITOR]
            if stop_after_epoch is None:
                stop_after_epoch = int(env[ENV_EPOCH])
            weights_attribute = env[ENV_WEIGHTS_ATTRIBUTE] if env[ENV_WEIGHTS] else None
            if env[ENV_SEED]:  # as the in-process executor seeds the trial (its module is usually built next)
                seed, trial_id = int(env[ENV_SEED]), int(env[ENV_TRIAL])
                seed_everything_quietly(initial_seed(seed, trial_id))
                self.seeder = TrialSeeder(trial_seed(seed, trial_id))
        if not monitor:
            raise ValueError(
                "FMSCheckpointCallback needs monitor= (the logged metric) unless it runs under lightning-fms agent"
            )
        self.monitor = monitor
        self.weights_attribute = weights_attribute
        self.stop_after_epoch = stop_after_epoch
        self.sink = sink
        self.reports: list[EpochReport] = []

    @property
    def last(self) -> EpochReport | None:
        """The latest report, or ``None`` before the first validation."""
        return self.reports[-1] if self.reports else None

    def _should_skip(self, trainer: pl.Trainer) -> bool:
        return trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.check_val_every_n_epoch not in (1, None):
            raise ValueError(
                f"FMSCheckpointCallback needs a validation every epoch (check_val_every_n_epoch=1), "
                f"got {trainer.check_val_every_n_epoch}"
            )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.seeder is not None:
            self.seeder.on_train_epoch_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.seeder is not None:
            self.seeder.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer):
            return
        epoch = trainer.current_epoch + 1
        metrics = trainer.callback_metrics
        report = EpochReport(epoch=epoch, value=float("nan"), available_metrics=sorted(metrics))
        if self.monitor not in metrics:
            report.error = f"metric {self.monitor!r} was never logged (logged: {', '.join(sorted(metrics)) or 'none'})"
        else:
            report.value = float(metrics[self.monitor])
            if not math.isfinite(report.value):
                report.error = f"metric {self.monitor!r} is {report.value} at epoch {epoch}"
        if self.weights_attribute is not None:
            module = self._watched(pl_module)
            if module is not None:
                report.weights = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        self.reports.append(report)
        if self.sink is not None and trainer.is_global_zero:
            self.sink(report)
        if self.stop_after_epoch is not None and epoch >= self.stop_after_epoch:
            trainer.should_stop = True

    def _watched(self, pl_module: pl.LightningModule) -> torch.nn.Module | None:
        """The submodule whose weights are recorded; under the agent, ``None`` if missing (``weights_error`` says)."""
        attribute = self.weights_attribute
        if not attribute:
            return pl_module
        if self.agent_env is None:
            return pl_module.get_submodule(attribute)
        try:
            return pl_module.get_submodule(attribute)
        except AttributeError:
            names = [name for name, _ in pl_module.named_children()]
            self.weights_error = (
                f"{type(pl_module).__name__} has no submodule {attribute!r} to record weights from "
                f"(its children: {', '.join(names) or 'none'}); give lightning-fms agent --weights_attribute"
            )
            return None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.agent_env is None or trainer.state.fn != TrainerFn.FITTING:
            return
        checkpoint = self.agent_env.get(ENV_CHECKPOINT)
        if checkpoint:
            tmp = temporary_path(checkpoint, per_process=False)  # the same name on every rank
            trainer.save_checkpoint(tmp)
            if trainer.is_global_zero:
                replace_atomically(tmp, checkpoint)
        if trainer.is_global_zero:
            last = self.last
            weights = self.agent_env.get(ENV_WEIGHTS) or None
            if weights and last is not None and last.weights is not None:
                with atomic_output(weights) as tmp:  # tensors only: the agent never unpickles what a script wrote
                    save_file({k: v.contiguous() for k, v in last.weights.items()}, str(tmp))
            result: dict[str, Any] = {
                "trial": int(self.agent_env.get(ENV_TRIAL) or -1),
                "epoch": last.epoch if last else 0,
                "value": last.value if last and math.isfinite(last.value) else None,
                "error": (last.error if last else "the run ended before its first validation"),
                "checkpoint": checkpoint or None,
                "weights": weights if weights and last is not None and last.weights is not None else None,
                "weights_error": self.weights_error,
            }
            atomic_write_text(Path(self.agent_env[ENV_RESULT]), json.dumps(result))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "values": [r.value for r in self.reports]}


def _agent_environment() -> dict[str, str] | None:
    """The agent's variables when run by ``lightning-fms agent``, else ``None``."""
    if not os.environ.get(ENV_STUDY_DIR):
        return None
    env = {name: os.environ.get(name, "") for name in AGENT_VARIABLES}
    missing = [name for name in (ENV_EPOCH, ENV_RESULT, ENV_MONITOR) if not env[name]]
    if missing:
        raise ValueError(
            f"{ENV_STUDY_DIR} is set but {', '.join(missing)} is not: run the script with lightning-fms agent"
        )
    return env
