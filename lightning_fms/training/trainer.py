"""The Lightning ``Trainer`` of a trial's epochs, built in one place.

:func:`trainer_for` is used by the in-process executor (one epoch per fit, resumed from the trial's checkpoint),
by the benchmark's pool builder (all of a configuration's epochs in one fit) and by the LightningCLI's one-batch
check (``fast_dev_run=1`` in ``options``). The benchmark's tables are
valid only while both train the same way, so both take their Trainer, their seeds and their notion of a
diverged epoch from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger

from lightning_fms.errors import FMSError
from lightning_fms.frozen.callback import FrozenUnits
from lightning_fms.frozen.levels import units_for_fraction
from lightning_fms.frozen.units import layer_units
from lightning_fms.training.callback import FMSCheckpointCallback
from lightning_fms.training.seeder import TrialSeeder, trial_seed

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


def check_trainer_options(options: Mapping[str, Any]) -> None:
    """Refuse ``Trainer`` arguments that the tuner sets itself (:data:`TUNER_TRAINER_KEYS`).

    Raises:
        FMSError: some are given.
    """
    forced = sorted(set(options) & set(TUNER_TRAINER_KEYS))
    if forced:
        raise FMSError(f"trainer option(s) {forced} are set by the tuner and cannot be given")


def trainer_for(
    module: pl.LightningModule,
    *,
    epochs: int,
    seed: int,
    trial_id: int,
    checkpoint: FMSCheckpointCallback,
    trainable_fraction: float | None = None,
    layer_attribute: str = "",
    logger: Logger | bool = False,
    callbacks: Sequence[pl.Callback] = (),
    options: Mapping[str, Any] | None = None,
) -> pl.Trainer:
    """The ``Trainer`` that fits trial ``trial_id`` up to epoch ``epochs``.

    Its callbacks are, in this order: the :class:`~lightning_fms.training.seeder.TrialSeeder` of the trial
    (seeded with :func:`~lightning_fms.training.seeder.trial_seed`), ``checkpoint``, a
    :class:`~lightning_fms.frozen.callback.FrozenUnits` training the last ``ceil(fraction * n)`` layer units
    when ``trainable_fraction`` is given, then ``callbacks``. Validation runs after every epoch, without
    sanity steps, progress bar, model summary or Lightning's own checkpointing.

    Args:
        module: The LightningModule the Trainer will fit (its layer units size the frozen-layer callback).
        epochs: ``max_epochs``.
        seed: The study's seed.
        trial_id: The trial.
        checkpoint: Records each epoch's value and weights.
        trainable_fraction: Share of layer units to train (``None``: all of them).
        layer_attribute: Submodule of ``module`` split into layer units (``""``: the whole module).
        logger: The Trainer's logger (``False``: none).
        callbacks: More callbacks, after the tuner's.
        options: More ``Trainer`` arguments (accelerator, devices, precision, limits, ...).

    Raises:
        FMSError: ``options`` sets one of :data:`TUNER_TRAINER_KEYS`.
    """
    options = dict(options or {})
    check_trainer_options(options)
    tuner_callbacks: list[pl.Callback] = [TrialSeeder(trial_seed(seed, trial_id)), checkpoint]
    if trainable_fraction is not None:
        net = module.get_submodule(layer_attribute) if layer_attribute else module
        k = units_for_fraction(trainable_fraction, len(layer_units(net)))
        tuner_callbacks.append(FrozenUnits(k, attribute=layer_attribute))
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=[*tuner_callbacks, *callbacks],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
        **options,
    )


def divergence(trainer: pl.Trainer, module: pl.LightningModule) -> str | None:
    """Why a fit diverged (a non-finite logged loss or parameter), or ``None`` when it did not."""
    for name, value in trainer.callback_metrics.items():
        if "loss" in name and value.numel() == 1 and not math.isfinite(float(value)):
            return f"{name} is {float(value)} (training diverged)"
    for name, param in module.named_parameters():
        if not torch.isfinite(param).all():
            return f"parameter {name} is not finite (training diverged)"
    return None
