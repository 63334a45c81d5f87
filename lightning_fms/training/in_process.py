"""InProcessExecutor: runs epochs with Lightning Trainers in this process.

Every epoch is a fresh ``Trainer(max_epochs=epoch)`` (:func:`~lightning_fms.training.trainer.trainer_for`)
that resumes from the trial's checkpoint with ``fit(ckpt_path=..., weights_only=True)``. That restores
weights, optimizer, LR scheduler and loop state exactly; :class:`~lightning_fms.training.seeder.TrialSeeder`
makes the data order and dropout of epoch ``k`` independent of how the epochs were split across fits.
(Calling ``fit`` again on the same Trainer after raising ``max_epochs`` would rebuild the optimizer and restart
the LR schedule.)

What a trial trains comes from a trial builder (:mod:`lightning_fms.training.trial_builder`): module and
datamodule factories (:meth:`InProcessExecutor.from_factories`), or a ``LightningCLI``
(:class:`lightning_fms.cli_trials.CLITrialBuilder`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fms.atomic import atomic_output
from lightning_fms.errors import FMSError, failure_message
from lightning_fms.frozen.costs import fraction_costs
from lightning_fms.hub import ModelHub
from lightning_fms.search.seeds import seed_everything_quietly
from lightning_fms.search.space import SearchSpace
from lightning_fms.training.callback import FMSCheckpointCallback
from lightning_fms.training.executor import EpochJob, EpochOutcome
from lightning_fms.training.quiet import quiet_lightning
from lightning_fms.training.seeder import initial_seed
from lightning_fms.training.trainer import divergence, trainer_for
from lightning_fms.training.trial_builder import (
    DEFAULT_EPOCHS_ARGUMENT,
    DEFAULT_HUB_ARGUMENT,
    BuiltTrial,
    FactoryTrialBuilder,
    TrialBuilder,
)
from lightning_fms.training.trial_logger import TrialCSVLogger


class InProcessExecutor:
    """Runs epochs with Lightning Trainers in this process (an :class:`~lightning_fms.training.executor.Executor`).

    Args:
        trial_builder: Builds a trial's module, datamodule and Trainer arguments from its configuration.
        monitor: The metric recorded outside a study's jobs (the benchmark's pool builder reads it); ``None``:
            each job names it (:attr:`~lightning_fms.training.executor.EpochJob.monitor`). Given, a job that
            monitors another metric is refused.
        hub: The model hub of :meth:`pretrained_module` (``None``: no hub choice).
        weights_attribute: Submodule of the trial's module whose weights are recorded and split into layer
            units (``""``: the whole module; ``None``: record no weights, split the whole module).
    """

    def __init__(
        self,
        trial_builder: TrialBuilder,
        *,
        monitor: str | None = None,
        hub: ModelHub | None = None,
        weights_attribute: str | None = "",
    ) -> None:
        self.trial_builder = trial_builder
        self.monitor = monitor
        self.hub = hub
        self.weights_attribute = weights_attribute

    @classmethod
    def from_factories(
        cls,
        module_factory: Callable[..., pl.LightningModule],
        datamodule_factory: Callable[..., pl.LightningDataModule],
        space: SearchSpace,
        hub: ModelHub | None,
        monitor: str | None = None,
        cap: int | None = None,
        hub_argument: str = DEFAULT_HUB_ARGUMENT,
        epochs_argument: str = DEFAULT_EPOCHS_ARGUMENT,
        weights_attribute: str | None = None,
        module_options: Mapping[str, Any] | None = None,
        datamodule_options: Mapping[str, Any] | None = None,
        trainer_options: Mapping[str, Any] | None = None,
    ) -> InProcessExecutor:
        """The executor of trials built by factories (a :class:`~.trial_builder.FactoryTrialBuilder`).

        Args:
            module_factory: Builds the LightningModule from keyword arguments (a class or a function).
            datamodule_factory: Builds the LightningDataModule from keyword arguments.
            space: The search space.
            hub: The model hub, or ``None`` when the space has no hub choice.
            monitor: The metric recorded outside a study's jobs (``None``: each job names it; given, a job
                that monitors another metric is refused).
            cap: The per-trial epoch cap of builds outside a study's jobs, passed to the module as
                ``epochs_argument`` if it accepts it (``None``: only a job's cap; given, a job with another cap
                is refused).
            hub_argument: Name of the module argument that receives the pretrained hub module.
            epochs_argument: Name of the module argument that receives the cap (LR schedule horizon).
            weights_attribute: Submodule whose weights are recorded (default: ``hub_argument`` with a hub,
                else none).
            module_options: Fixed module arguments (the space's values override them).
            datamodule_options: Fixed datamodule arguments (the space's values override them).
            trainer_options: Extra ``Trainer`` arguments (accelerator, devices, precision, limits, ...).

        Raises:
            FMSError: ``trainer_options`` sets what the tuner sets, or a hub choice without a hub.
        """
        builder = FactoryTrialBuilder(
            module_factory,
            datamodule_factory,
            space,
            hub,
            cap,
            hub_argument=hub_argument,
            epochs_argument=epochs_argument,
            module_options=module_options,
            datamodule_options=datamodule_options,
            trainer_options=trainer_options,
        )
        if weights_attribute is None and hub is not None:
            weights_attribute = hub_argument
        return cls(builder, monitor=monitor, hub=hub, weights_attribute=weights_attribute)

    # ------------------------------------------------------------------ building
    def pretrained_module(self, entry: str | None) -> torch.nn.Module | None:
        """The hub entry's module with its pretrained weights (``None`` without a hub)."""
        if self.hub is None or entry is None:
            return None
        return self.hub.build(str(entry))

    def build_trial(
        self,
        config: Mapping[str, Any],
        seed: int | None = None,
        trial_dir: Path | None = None,
        cap: int | None = None,
    ) -> BuiltTrial:
        """Build a trial's module, datamodule and Trainer arguments.

        Args:
            config: The trial's configuration.
            seed: Seeds the global generators first, so freshly initialised layers (a new head) are
                the same every time the trial starts.
            trial_dir: The trial's folder, when the build is for one of its epochs.
            cap: The study's per-trial cap, when the build is for one of its epochs (``None``: the builder's).

        Raises:
            FMSError: the builder rejects the configuration or the cap.
        """
        if seed is not None:
            seed_everything_quietly(seed)
        return self.trial_builder(config, trial_dir, cap=cap)

    def build(
        self, config: Mapping[str, Any], seed: int | None = None
    ) -> tuple[pl.LightningModule, pl.LightningDataModule | None]:
        """The module and datamodule of a configuration (see :meth:`build_trial`)."""
        trial = self.build_trial(config, seed=seed)
        return trial.module, trial.datamodule

    @property
    def layer_attribute(self) -> str:
        """The submodule of a trial's module split into layer units (``""``: the whole module)."""
        return self.weights_attribute or ""

    def layer_target(self, module: pl.LightningModule) -> torch.nn.Module:
        """The part of a trial's module split into layer units: the hub network, else the whole module."""
        attribute = self.layer_attribute
        return module.get_submodule(attribute) if attribute else module

    def frozen_layer_costs(
        self, configs: Sequence[dict[str, Any]], fractions: tuple[float, ...]
    ) -> list[tuple[float, ...]]:
        """The frozen-layer cost model of each configuration's architecture at each fraction.

        One real training batch (from the first configuration's datamodule, set up once) is used for all of
        them. See :func:`lightning_fms.frozen.costs.fraction_costs`.
        """
        batch = None
        costs = []
        for config in configs:
            module, datamodule = self.build(config, seed=0)
            if batch is None:
                if datamodule is None:
                    raise FMSError("the frozen-layer cost model needs a LightningDataModule")
                with quiet_lightning():
                    datamodule.prepare_data()
                    datamodule.setup("fit")
                    batch = next(iter(datamodule.train_dataloader()))
            costs.append(fraction_costs(module, self.layer_target(module), batch, fractions)[1])
        return costs

    # ------------------------------------------------------------------ running
    def run_epoch(self, job: EpochJob) -> EpochOutcome:
        """Train one epoch and write the trial's checkpoint.

        The job's monitor is recorded and its cap goes to the trial builder.

        Raises:
            FMSError: a problem with the user's set-up (bad arguments, metric never logged, a monitor or cap
                other than the executor's own); the study must stop. Anything training itself raises is
                returned as ``EpochOutcome.error``.
        """
        start = time.perf_counter()
        if self.monitor is not None and job.monitor != self.monitor:
            raise FMSError(
                f"the study monitors {job.monitor!r} but the executor was built with monitor={self.monitor!r} "
                "(give one monitor)"
            )
        trial = self.build_trial(
            job.config, seed=initial_seed(job.seed, job.trial_id), trial_dir=job.log_dir, cap=job.cap
        )
        module = trial.module
        callback = FMSCheckpointCallback(
            monitor=job.monitor,
            weights_attribute=self.weights_attribute if job.record_weights else None,
            stop_after_epoch=job.epoch,
        )
        job.log_dir.mkdir(parents=True, exist_ok=True)
        outcome = EpochOutcome()
        with quiet_lightning():
            trainer = trainer_for(
                module,
                epochs=job.epoch,
                seed=job.seed,
                trial_id=job.trial_id,
                checkpoint=callback,
                trainable_fraction=job.trainable_fraction,
                layer_attribute=self.layer_attribute,
                logger=TrialCSVLogger(save_dir=str(job.log_dir), name="", version="logs"),
                options=trial.trainer_options,
            )
            try:
                trainer.fit(
                    module,
                    datamodule=trial.datamodule,
                    ckpt_path=str(job.resume_from) if job.resume_from is not None else None,
                    weights_only=True,
                )
            except (KeyboardInterrupt, FMSError):
                raise
            except Exception as error:  # the trial fails, the study goes on
                outcome.error = failure_message(error)
                outcome.wall_s = time.perf_counter() - start
                return outcome
        report = callback.last
        if report is None or trainer.current_epoch != job.epoch:
            outcome.error = f"no validation ran in epoch {job.epoch}"
        elif report.error is not None and job.monitor not in report.available_metrics:
            raise FMSError(report.error)
        else:
            outcome.value = report.value
            outcome.weights = report.weights
            outcome.error = report.error or divergence(trainer, module)
            outcome.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if outcome.error is None:
            with atomic_output(job.checkpoint_out) as tmp:
                trainer.save_checkpoint(tmp, weights_only=False)
        outcome.wall_s = time.perf_counter() - start
        return outcome
