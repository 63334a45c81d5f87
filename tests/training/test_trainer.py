"""trainer_for: the one Trainer of a trial's epochs (executor and benchmark pool); divergence; seeds."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_fms.errors import FMSError
from lightning_fms.frozen.callback import FrozenUnits
from lightning_fms.frozen.units import layer_units
from lightning_fms.search.seeds import derive_seed
from lightning_fms.training.callback import FMSCheckpointCallback
from lightning_fms.training.seeder import TrialSeeder, initial_seed
from lightning_fms.training.trainer import TUNER_TRAINER_KEYS, divergence, trainer_for
from lightning_fms.zoo import DigitsDataModule, ImageClassifier


@pytest.fixture
def module(hub):
    return ImageClassifier(hub.build("resnet-xs"), lr=0.05)


def test_the_tuners_settings_and_callbacks_in_order(module):
    checkpoint = FMSCheckpointCallback(monitor="val_acc")
    extra = Callback()
    trainer = trainer_for(
        module,
        epochs=4,
        seed=3,
        trial_id=5,
        checkpoint=checkpoint,
        trainable_fraction=0.4,
        layer_attribute="net",
        callbacks=[extra],
        options={"accelerator": "cpu", "limit_train_batches": 3},
    )
    assert trainer.max_epochs == 4 and trainer.limit_train_batches == 3
    assert trainer.num_sanity_val_steps == 0 and trainer.check_val_every_n_epoch == 1
    assert trainer.logger is None and not trainer.checkpoint_callbacks and trainer.progress_bar_callback is None
    ours = [
        c for c in trainer.callbacks if isinstance(c, (TrialSeeder, FMSCheckpointCallback, FrozenUnits)) or c is extra
    ]
    seeder, first, frozen, last = ours
    assert isinstance(seeder, TrialSeeder) and seeder.seed == derive_seed(3, "trial", 5)
    assert first is checkpoint and last is extra
    n = len(layer_units(module.net))
    assert isinstance(frozen, FrozenUnits) and frozen.attribute == "net" and frozen.k == math.ceil(0.4 * n) < n


def test_no_frozen_units_without_a_fraction_and_forced_keys_are_refused(module):
    checkpoint = FMSCheckpointCallback(monitor="val_acc")
    trainer = trainer_for(module, epochs=1, seed=0, trial_id=0, checkpoint=checkpoint)
    assert not any(isinstance(c, FrozenUnits) for c in trainer.callbacks)
    for key in TUNER_TRAINER_KEYS:
        with pytest.raises(FMSError, match=f"'{key}'"):
            trainer_for(module, epochs=1, seed=0, trial_id=0, checkpoint=checkpoint, options={key: None})


def test_divergence_names_a_non_finite_loss_or_parameter(module):
    checkpoint = FMSCheckpointCallback(monitor="val_acc")
    trainer = trainer_for(
        module,
        epochs=1,
        seed=0,
        trial_id=0,
        checkpoint=checkpoint,
        options={"accelerator": "cpu", "limit_train_batches": 1, "limit_val_batches": 1},
    )
    trainer.fit(module, datamodule=DigitsDataModule(task="target"))
    assert divergence(trainer, module) is None
    trainer.callback_metrics["train_loss"] = torch.tensor(float("nan"))
    assert divergence(trainer, module) == "train_loss is nan (training diverged)"
    del trainer.callback_metrics["train_loss"]
    with torch.no_grad():
        module.net.head.bias[0] = float("inf")
    assert divergence(trainer, module) == "parameter net.head.bias is not finite (training diverged)"


def test_initial_seeds_differ_per_trial_and_study():
    assert initial_seed(0, 1) == derive_seed(0, "init", 1) == initial_seed(0, 1)
    assert len({initial_seed(0, 1), initial_seed(0, 2), initial_seed(1, 1)}) == 3
