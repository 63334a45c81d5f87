"""FMSCheckpointCallback with real Trainers: the value of the epoch just validated, weights, stopping, agent mode
(its weights file, and its seeding: the user's epoch equals the in-process executor's)."""

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fms.search.space import SearchSpace
from lightning_fms.testing.executors import assert_same_tensors
from lightning_fms.training.callback import (
    AGENT_VARIABLES,
    ENV_CHECKPOINT,
    ENV_EPOCH,
    ENV_MONITOR,
    ENV_RESULT,
    ENV_SEED,
    ENV_STUDY_DIR,
    ENV_TRIAL,
    ENV_WEIGHTS,
    ENV_WEIGHTS_ATTRIBUTE,
    FMSCheckpointCallback,
)
from lightning_fms.training.executor import EpochJob
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.zoo import DigitsDataModule, ImageClassifier


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
        "weights": None,  # the study reads no weights: none written
        "weights_error": None,
    }
    assert not list(tmp_path.glob("*.safetensors"))
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


def agent_environment(monkeypatch, tmp_path, trial="7", epoch="2", monitor="score", **more):
    """The variables ``lightning-fms agent`` sets (see CommandRunner.environment), for the callback in this process."""
    values = {
        ENV_STUDY_DIR: str(tmp_path),
        ENV_TRIAL: trial,
        ENV_EPOCH: epoch,
        ENV_MONITOR: monitor,
        ENV_RESULT: str(tmp_path / f"epoch-{epoch}.json"),
        ENV_CHECKPOINT: str(tmp_path / f"epoch-{epoch}.ckpt"),
        **more,
    }
    for name in AGENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def test_under_the_agent_it_writes_the_named_submodules_weights_as_safetensors(tmp_path, monkeypatch):
    weights = tmp_path / "epoch-2.safetensors"
    agent_environment(monkeypatch, tmp_path, **{ENV_WEIGHTS: str(weights), ENV_WEIGHTS_ATTRIBUTE: "net"})
    callback = FMSCheckpointCallback(weights_attribute=None)  # the study decides: the agent's variables win
    _, module = fit(callback, max_epochs=10)
    result = json.loads((tmp_path / "epoch-2.json").read_text())
    assert result["weights"] == str(weights) and result["weights_error"] is None
    written = load_file(str(weights))  # tensors only, no pickle
    assert set(written) == {"weight", "bias"}
    assert torch.equal(written["weight"], module.net.weight.detach())  # the weights after epoch 2

    # a submodule the module does not have is named, for the agent to stop on; nothing is written
    weights.unlink()
    agent_environment(monkeypatch, tmp_path, **{ENV_WEIGHTS: str(weights), ENV_WEIGHTS_ATTRIBUTE: "backbone"})
    fit(FMSCheckpointCallback(), max_epochs=10)
    result = json.loads((tmp_path / "epoch-2.json").read_text())
    assert result["weights"] is None and not weights.exists()
    assert "Regressor has no submodule 'backbone'" in result["weights_error"] and "net" in result["weights_error"]
    assert "--weights_attribute" in result["weights_error"]


def test_the_users_own_epoch_under_the_agent_is_the_in_process_executors_bit_for_bit(hub, tmp_path, monkeypatch):
    """What makes an agent's study the tuner's: the callback seeds a plain script as the executor seeds a trial.

    The "script" builds the callback first, then the module and the data itself, and fits with Lightning's
    defaults (sanity validation steps included); epoch 1, then epoch 2 resumed from its checkpoint, equal the
    in-process executor's bit for bit. Without the study's seed in the environment they do not.
    """
    space = SearchSpace.from_dict(
        {"hub": {"type": "hub"}, "model.lr": {"type": "float", "low": 1e-3, "high": 0.3},
         "model.dropout": {"type": "float", "low": 0.0, "high": 0.5}},  # dropout draws: the seeder must fix them
        hub_entries=hub.names,
    )  # fmt: skip
    config = {"hub": "cnn-s", "model.lr": 0.05, "model.dropout": 0.3}
    executor = InProcessExecutor.from_factories(
        ImageClassifier, DigitsDataModule, space, hub, datamodule_options={"task": "target"},
        trainer_options={"accelerator": "cpu"},
    )  # fmt: skip
    jobs, resume = [], None
    for epoch in (1, 2):
        job = EpochJob(trial_id=3, config=config, epoch=epoch, resume_from=resume, seed=11, monitor="val_acc", cap=4,
                       checkpoint_out=tmp_path / f"tuner-{epoch}.ckpt", log_dir=tmp_path / "tuner")  # fmt: skip
        assert executor.run_epoch(job).error is None
        jobs.append(job)
        resume = job.checkpoint_out

    def script(epoch: int, resume: str | None, seed: str | None) -> dict:
        more = {ENV_SEED: seed} if seed is not None else {}
        values = agent_environment(monkeypatch, tmp_path / f"agent-{seed}", trial="3", epoch=str(epoch),
                                   monitor="val_acc", **more)  # fmt: skip
        callback = FMSCheckpointCallback()
        module = ImageClassifier(hub.build("cnn-s"), lr=0.05, dropout=0.3, max_epochs=4)
        trainer = pl.Trainer(max_epochs=4, callbacks=[callback], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
        trainer.fit(module, datamodule=DigitsDataModule(task="target"), ckpt_path=resume, weights_only=True)
        assert trainer.current_epoch == epoch
        return torch.load(values[ENV_CHECKPOINT], map_location="cpu", weights_only=True)

    first = script(1, None, "11")
    second = script(2, str(tmp_path / "agent-11" / "epoch-1.ckpt"), "11")
    for job, saved in zip(jobs, (first, second), strict=True):
        expected = torch.load(job.checkpoint_out, map_location="cpu", weights_only=True)
        assert_same_tensors(saved["state_dict"], expected["state_dict"], f"epoch {job.epoch} state_dict")
        assert_same_tensors(saved["optimizer_states"], expected["optimizer_states"], f"epoch {job.epoch} optimizer")
    unseeded = script(1, None, None)
    assert any(not torch.equal(v, unseeded["state_dict"][k]) for k, v in first["state_dict"].items())
