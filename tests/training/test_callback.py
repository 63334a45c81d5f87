"""FMSCheckpointCallback with real Trainers: the value of the epoch just validated, weights, stopping, agent mode."""

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fms.training.callback import (
    ENV_CHECKPOINT,
    ENV_EPOCH,
    ENV_MONITOR,
    ENV_RESULT,
    ENV_STUDY_DIR,
    ENV_TRIAL,
    FMSCheckpointCallback,
)


class Regressor(pl.LightningModule):
    """Logs ``score = 10 * epoch`` in ``on_validation_epoch_end`` (the case ``on_validation_epoch_end`` callbacks
    would see one epoch late), and ``bad`` as NaN from the second epoch on."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def on_validation_epoch_end(self):
        self.log("score", 10.0 * (self.current_epoch + 1))
        self.log("bad", math.nan if self.current_epoch >= 1 else 1.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loaders():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, generator=generator)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    return DataLoader(data, batch_size=8), DataLoader(data, batch_size=16)


def fit(callback, max_epochs=3, **trainer_options):
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        **trainer_options,
    )
    module = Regressor()
    trainer.fit(module, *loaders())
    return trainer, module


def test_each_report_holds_the_value_logged_in_that_epoch_and_stops_where_told():
    seen = []
    callback = FMSCheckpointCallback(monitor="score", weights_attribute="net", stop_after_epoch=2, sink=seen.append)
    trainer, module = fit(callback, max_epochs=5)
    assert trainer.current_epoch == 2, "the run did not stop after the epoch it was told"
    assert [(r.epoch, r.value, r.error) for r in callback.reports] == [(1, 10.0, None), (2, 20.0, None)]
    assert seen == callback.reports
    weights = callback.last.weights
    assert set(weights) == {"weight", "bias"}
    assert torch.equal(weights["weight"], module.net.weight.detach())
    module.net.weight.data.add_(1.0)
    assert not torch.equal(weights["weight"], module.net.weight.detach()), "the weights are a view, not a copy"


def test_a_metric_never_logged_and_a_non_finite_one_are_errors_of_the_report():
    missing = FMSCheckpointCallback(monitor="val_acc", weights_attribute=None, stop_after_epoch=1)
    fit(missing)
    assert missing.last.weights is None
    assert "'val_acc' was never logged" in missing.last.error and "val_loss" in missing.last.error
    bad = FMSCheckpointCallback(monitor="bad", weights_attribute=None, stop_after_epoch=2)
    fit(bad)
    assert bad.reports[0].error is None and "is nan at epoch 2" in bad.reports[1].error


def test_validation_must_run_every_epoch_and_monitor_is_required(monkeypatch):
    monkeypatch.delenv(ENV_STUDY_DIR, raising=False)
    with pytest.raises(ValueError, match="needs monitor="):
        FMSCheckpointCallback()
    with pytest.raises(ValueError, match="check_val_every_n_epoch=1"):
        fit(FMSCheckpointCallback(monitor="score"), check_val_every_n_epoch=2)


def test_under_the_agent_it_takes_everything_from_the_environment_and_writes_checkpoint_and_result(
    tmp_path, monkeypatch
):
    result, checkpoint = tmp_path / "result.json", tmp_path / "epoch-2.ckpt"
    for name, value in {
        ENV_STUDY_DIR: str(tmp_path),
        ENV_TRIAL: "7",
        ENV_EPOCH: "2",
        ENV_MONITOR: "score",
        ENV_RESULT: str(result),
        ENV_CHECKPOINT: str(checkpoint),
    }.items():
        monkeypatch.setenv(name, value)
    callback = FMSCheckpointCallback()
    trainer, _ = fit(callback, max_epochs=10)
    assert trainer.current_epoch == 2
    assert json.loads(result.read_text()) == {
        "trial": 7,
        "epoch": 2,
        "value": 20.0,
        "error": None,
        "checkpoint": str(checkpoint),
    }
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2 and "net.weight" in saved["state_dict"]  # two epochs done: a resume runs the third
    assert not list(tmp_path.glob("*.tmp"))


def test_under_the_agent_a_missing_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_STUDY_DIR, str(tmp_path))
    monkeypatch.setenv(ENV_EPOCH, "1")
    for name in (ENV_RESULT, ENV_MONITOR):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=f"{ENV_RESULT}, {ENV_MONITOR} is not"):
        FMSCheckpointCallback()
