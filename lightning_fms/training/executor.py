"""Executors run one epoch of one trial.

The tuner only talks to this seam, so where an epoch runs (this process now, a Ray worker later) does
not change the tuner.

The in-process executor builds a fresh ``Trainer(max_epochs=epoch)`` per epoch and resumes from the
trial's checkpoint with ``fit(ckpt_path=..., weights_only=True)``. That restores weights, optimizer,
LR scheduler and loop state exactly; :class:`~lightning_fms.search.seeds.TrialSeeder` makes the data order
and dropout of epoch ``k`` independent of how the epochs were split across fits. (Calling ``fit``
again on the same Trainer after raising ``max_epochs`` would rebuild the optimizer and restart the LR
schedule.)
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fms.errors import FMSError
from lightning_fms.frozen.callback import FrozenUnits
from lightning_fms.frozen.costs import fraction_costs
from lightning_fms.frozen.levels import units_for_fraction
from lightning_fms.frozen.units import layer_units
from lightning_fms.hub import ModelHub
from lightning_fms.search.seeds import derive_seed, seed_everything_quietly
from lightning_fms.search.space import SearchSpace
from lightning_fms.study.atomic import atomic_output
from lightning_fms.training.callback import FMSCheckpointCallback
from lightning_fms.training.quiet import quiet_lightning
from lightning_fms.training.seeder import TrialSeeder
from lightning_fms.training.trial_logger import TrialCSVLogger

#: ``Trainer`` arguments the tuner sets itself for every epoch; users cannot override them.
TUNER_TRAINER_KEYS = (
    "max_epochs",
    "callbacks",
    "logger",
    "enable_checkpointing",
    "enable_progress_bar",
    "enable_model_summary",
    "num_sanity_val_steps",
    "check_val_every_n_epoch",
)


@dataclass(frozen=True)
class EpochJob:
    """Train epoch ``epoch`` of trial ``trial_id`` with ``config``, starting from ``resume_from`` (None: pretrained)."""

    trial_id: int
    config: dict[str, Any]
    epoch: int
    resume_from: Path | None
    checkpoint_out: Path
    log_dir: Path
    seed: int
    trainable_fraction: float | None = None
    """Share of layer units trained in this epoch (frozen-layer fidelity); ``None``: no layers frozen."""


@dataclass
class EpochOutcome:
    """What an epoch produced. ``error`` set means the trial failed (the study goes on)."""

    value: float = math.nan
    weights: dict[str, torch.Tensor] | None = None
    error: str | None = None
    wall_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


class InProcessExecutor:
    """Runs epochs with Lightning Trainers in this process.

    Args:
        module_factory: Builds the LightningModule from keyword arguments (a class or a function).
        datamodule_factory: Builds the LightningDataModule from keyword arguments.
        space: The search space (splits a configuration into hub entry, module and data arguments).
        hub: The model hub, or ``None`` when the space has no hub choice.
        monitor: Metric to record.
        cap: The per-trial epoch cap, passed to the module as ``epochs_argument`` if it accepts it.
        hub_argument: Name of the module argument that receives the pretrained hub module.
        epochs_argument: Name of the module argument that receives the cap (LR schedule horizon).
        weights_attribute: Submodule whose weights are snapshot (``""``: the whole module; ``None``: none).
        module_options: Fixed module arguments (the space's values override them).
        datamodule_options: Fixed datamodule arguments (the space's values override them).
        trainer_options: Extra ``Trainer`` arguments (accelerator, devices, precision, limits, ...).
    """

    def __init__(
        self,
        module_factory: Callable[..., pl.LightningModule],
        datamodule_factory: Callable[..., pl.LightningDataModule],
        space: SearchSpace,
        hub: ModelHub | None,
        monitor: str,
        cap: int,
        hub_argument: str = "net",
        epochs_argument: str = "max_epochs",
        weights_attribute: str | None = None,
        module_options: dict[str, Any] | None = None,
        datamodule_options: dict[str, Any] | None = None,
        trainer_options: dict[str, Any] | None = None,
    ) -> None:
        forced = sorted(set(trainer_options or {}) & set(TUNER_TRAINER_KEYS))
        if forced:
            raise FMSError(f"trainer option(s) {forced} are set by the tuner and cannot be given")
        if space.hub_key is not None and hub is None:
            raise FMSError(f"the space has a hub choice {space.hub_key!r} but no model hub was given")
        self.module_factory = module_factory
        self.datamodule_factory = datamodule_factory
        self.space = space
        self.hub = hub
        self.monitor = monitor
        self.cap = cap
        self.hub_argument = hub_argument
        self.epochs_argument = epochs_argument
        self.weights_attribute = hub_argument if weights_attribute is None and hub is not None else weights_attribute
        self.module_options = dict(module_options or {})
        self.datamodule_options = dict(datamodule_options or {})
        self.trainer_options = dict(trainer_options or {})
        self.record_weights = False

    # ------------------------------------------------------------------ building
    def pretrained_module(self, entry: str | None) -> torch.nn.Module | None:
        """The hub entry's module with its pretrained weights (``None`` without a hub)."""
        if self.hub is None or entry is None:
            return None
        return self.hub.build(str(entry))

    def build(
        self, config: dict[str, Any], seed: int | None = None
    ) -> tuple[pl.LightningModule, pl.LightningDataModule]:
        """Instantiate the module and datamodule of a configuration.

        Args:
            config: The trial's configuration.
            seed: Seeds the global generators first, so freshly initialised layers (a new head) are
                the same every time the trial starts.

        Raises:
            FMSError: the factories reject the arguments (a space key that is not an argument, ...).
        """
        entry, model_args, data_args = self.space.split(config)
        if seed is not None:
            seed_everything_quietly(seed)
        kwargs = {**self.module_options, **model_args}
        net = self.pretrained_module(entry)
        if net is not None:
            kwargs[self.hub_argument] = net
        if self.epochs_argument and accepts_argument(self.module_factory, self.epochs_argument):
            kwargs.setdefault(self.epochs_argument, self.cap)
        module = _call(self.module_factory, kwargs, "module")
        datamodule = _call(self.datamodule_factory, {**self.datamodule_options, **data_args}, "datamodule")
        return module, datamodule

    def layer_target(self, module: pl.LightningModule) -> torch.nn.Module:
        """The part of a trial's module split into layer units: the hub network, else the whole module."""
        attribute = self.weights_attribute or ""
        return module.get_submodule(attribute) if attribute else module

    def frozen_layer_costs(
        self, configs: Sequence[dict[str, Any]], fractions: tuple[float, ...]
    ) -> list[tuple[float, ...]]:
        """The frozen-layer cost model of each configuration's architecture at each fraction.

        One real training batch (from the first configuration's datamodule, set up once) is used for all of
        them. See :func:`lightning_fms.frozen.levels.fraction_costs`.
        """
        batch = None
        costs = []
        for config in configs:
            module, datamodule = self.build(config, seed=0)
            if batch is None:
                with quiet_lightning():
                    datamodule.prepare_data()
                    datamodule.setup("fit")
                    batch = next(iter(datamodule.train_dataloader()))
            costs.append(fraction_costs(module, self.layer_target(module), batch, fractions)[1])
        return costs

    # ------------------------------------------------------------------ running
    def run_epoch(self, job: EpochJob) -> EpochOutcome:
        """Train one epoch and write the trial's checkpoint.

        Raises:
            FMSError: a problem with the user's set-up (bad arguments, metric never logged); the study
                must stop. Anything training itself raises is returned as ``EpochOutcome.error``.
        """
        start = time.perf_counter()
        module, datamodule = self.build(job.config, seed=derive_seed(job.seed, "init", job.trial_id))
        callback = FMSCheckpointCallback(
            monitor=self.monitor,
            weights_attribute=self.weights_attribute if self.record_weights else None,
            stop_after_epoch=job.epoch,
        )
        callbacks: list[pl.Callback] = [TrialSeeder(derive_seed(job.seed, "trial", job.trial_id)), callback]
        if job.trainable_fraction is not None:
            net = self.layer_target(module)
            k = units_for_fraction(job.trainable_fraction, len(layer_units(net)))
            callbacks.append(FrozenUnits(k, attribute=self.weights_attribute or ""))
        job.log_dir.mkdir(parents=True, exist_ok=True)
        outcome = EpochOutcome()
        with quiet_lightning():
            trainer = pl.Trainer(
                max_epochs=job.epoch,
                callbacks=callbacks,
                logger=TrialCSVLogger(save_dir=str(job.log_dir), name="", version="logs"),
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                check_val_every_n_epoch=1,
                **self.trainer_options,
            )
            try:
                trainer.fit(
                    module,
                    datamodule=datamodule,
                    ckpt_path=str(job.resume_from) if job.resume_from is not None else None,
                    weights_only=True,
                )
            except (KeyboardInterrupt, FMSError):
                raise
            except Exception as error:  # the trial fails, the study goes on
                outcome.error = f"{type(error).__name__}: {error}"
                outcome.wall_s = time.perf_counter() - start
                return outcome
        report = callback.last
        if report is None or trainer.current_epoch != job.epoch:
            outcome.error = f"no validation ran in epoch {job.epoch}"
        elif report.error is not None and self.monitor not in report.available_metrics:
            raise FMSError(report.error)
        else:
            outcome.value = report.value
            outcome.weights = report.weights
            outcome.error = report.error or _divergence(trainer, module)
            outcome.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if outcome.error is None:
            with atomic_output(job.checkpoint_out) as tmp:
                trainer.save_checkpoint(tmp, weights_only=False)
        outcome.wall_s = time.perf_counter() - start
        return outcome


def _divergence(trainer: pl.Trainer, module: pl.LightningModule) -> str | None:
    for name, value in trainer.callback_metrics.items():
        if "loss" in name and value.numel() == 1 and not math.isfinite(float(value)):
            return f"{name} is {float(value)} (training diverged)"
    for name, param in module.named_parameters():
        if not torch.isfinite(param).all():
            return f"parameter {name} is not finite (training diverged)"
    return None


def accepts_argument(factory: Callable[..., Any], name: str, unknown: bool = False) -> bool:
    """Whether ``factory(**{name: ...})`` is a valid call; ``unknown`` when its signature cannot be read."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return unknown
    return name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def _call(factory: Callable[..., Any], kwargs: dict[str, Any], what: str) -> Any:
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as error:
        shown = {k: v for k, v in kwargs.items() if not isinstance(v, torch.nn.Module)}
        raise FMSError(
            f"cannot build the {what} {getattr(factory, '__name__', factory)} with {shown}: {error}"
        ) from None
    except ValueError:
        pass
    return factory(**kwargs)
