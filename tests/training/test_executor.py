"""InProcessExecutor: what is specific to running epochs in this process (the shared contract is elsewhere)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_fms.errors import FMSError
from lightning_fms.search.seeds import derive_seed
from lightning_fms.search.space import SearchSpace
from lightning_fms.training.executor import EpochJob, Executor
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.training.seeder import TrialSeeder
from lightning_fms.training.trial_builder import BuiltTrial
from lightning_fms.zoo import DigitsDataModule, ImageClassifier

SPACE_SPEC = {
    "hub": {"type": "hub"},
    "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
}


class SilentClassifier(ImageClassifier):
    def validation_step(self, batch, batch_idx):
        return None


def job(folder, trial_id, config, epoch, resume=None, **options):
    fields = {"seed": 0, "monitor": "val_acc", "cap": 5, **options}
    return EpochJob(
        trial_id, config, epoch, resume, folder / f"t{trial_id}-e{epoch}.ckpt", folder / f"log{trial_id}", **fields
    )


def test_it_is_an_executor():
    assert issubclass(InProcessExecutor, Executor)


def test_split_epochs_equal_a_plain_lightning_fit_with_the_trial_seeder(hub, tmp_path):
    """The reference the tuner relies on: epochs in fresh resumed Trainers equal one plain fit of 3 epochs."""
    space = SearchSpace.from_dict(SPACE_SPEC, hub_entries=hub.names)
    config = {"hub": "cnn-s", "model.lr": 0.05, "model.dropout": 0.3}
    other = {"hub": "mlp-s", "model.lr": 0.1, "model.dropout": 0.1}
    executor = InProcessExecutor.from_factories(ImageClassifier, DigitsDataModule, space, hub, monitor="val_acc", cap=5)
    resume = None
    for epoch in (1, 2, 3):
        assert executor.run_epoch(job(tmp_path, 7, config, epoch, resume)).error is None
        resume = tmp_path / f"t7-e{epoch}.ckpt"
        other_resume = tmp_path / f"t8-e{epoch - 1}.ckpt" if epoch > 1 else None
        assert executor.run_epoch(job(tmp_path, 8, other, epoch, other_resume)).error is None  # interleaved trial
    split = torch.load(resume, weights_only=True)

    module, datamodule = executor.build(config, seed=derive_seed(0, "init", 7))
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[TrialSeeder(derive_seed(0, "trial", 7))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    straight = module.state_dict()
    for key, value in straight.items():
        assert torch.equal(value, split["state_dict"][key]), key
    # the LR schedule follows the trial cap (5), not the Trainer's max_epochs
    assert split["lr_schedulers"][0]["T_max"] == 5
    assert split["lr_schedulers"][0]["last_epoch"] == 3
    assert split["optimizer_states"][0]["state"], "momentum buffers are restored"


def test_set_up_problems_are_refused(hub, tmp_path):
    space = SearchSpace.from_dict(SPACE_SPEC, hub_entries=hub.names)
    with pytest.raises(FMSError, match=r"\['max_epochs'\] are set by the tuner"):
        InProcessExecutor.from_factories(
            ImageClassifier, DigitsDataModule, space, hub, monitor="val_acc", cap=3, trainer_options={"max_epochs": 9}
        )
    with pytest.raises(FMSError, match="hub choice 'hub' but no model hub"):
        InProcessExecutor.from_factories(ImageClassifier, DigitsDataModule, space, None, monitor="val_acc", cap=3)
    silent = InProcessExecutor.from_factories(SilentClassifier, DigitsDataModule, space, hub, monitor="val_acc", cap=3)
    config = {"hub": "mlp-s", "model.lr": 0.05, "model.dropout": 0.0}
    with pytest.raises(FMSError, match="'val_acc' was never logged"):  # raised: no other trial would log it either
        silent.run_epoch(job(tmp_path, 1, config, 1, cap=3))
    assert not (tmp_path / "t1-e1.ckpt").exists()
    typo = {"hub": "mlp-s", "model.learning_rate": 0.05}
    with pytest.raises(
        FMSError, match="cannot build the module SilentClassifier .* unexpected keyword argument .learning_rate."
    ):
        silent.run_epoch(job(tmp_path, 2, typo, 1, cap=3))


def test_the_factories_receive_the_hub_module_the_cap_and_the_options(hub):
    space = SearchSpace.from_dict(SPACE_SPEC, hub_entries=hub.names)
    executor = InProcessExecutor.from_factories(
        ImageClassifier,
        DigitsDataModule,
        space,
        hub,
        monitor="val_acc",
        cap=4,
        module_options={"lr": 0.5, "momentum": 0.0},
        datamodule_options={"batch_size": 16},
        trainer_options={"accelerator": "cpu"},
    )
    assert executor.weights_attribute == "net"  # the hub argument, by default
    trial = executor.build_trial({"hub": "cnn-xs", "model.lr": 0.02, "model.dropout": 0.1})
    pretrained = hub.build("cnn-xs").state_dict()
    net = trial.module.net.state_dict()
    assert all(torch.equal(net[k], v) for k, v in pretrained.items() if not k.startswith("head."))
    assert trial.module.hparams.lr == 0.02 and trial.module.hparams.momentum == 0.0  # the space wins
    assert trial.module.hparams.max_epochs == 4
    assert trial.datamodule.hparams.batch_size == 16
    assert trial.trainer_options == {"accelerator": "cpu"}


class RecordingBuilder:
    """A trial builder of its own: what an executor needs from a builder, and nothing more."""

    def __init__(self, hub):
        self.hub = hub
        self.calls = []

    def __call__(self, config, trial_dir=None, cap=None):
        self.calls.append((dict(config), trial_dir, torch.rand(1).item()))
        module = ImageClassifier(self.hub.build(config["hub"]), lr=config["lr"])
        options = {"accelerator": "cpu", "limit_train_batches": 2, "limit_val_batches": 1}
        return BuiltTrial(module, DigitsDataModule(task="target"), options)


def test_any_trial_builder_plugs_in_and_its_trainer_options_travel_per_trial(hub, tmp_path):
    builder = RecordingBuilder(hub)
    executor = InProcessExecutor(builder, monitor="val_acc", hub=hub, weights_attribute="net")
    config = {"hub": "resnet-xs", "lr": 0.05}
    first = executor.run_epoch(job(tmp_path, 3, config, 1, record_weights=True))
    assert first.error is None and set(first.weights) == set(hub.build("resnet-xs").state_dict())
    assert torch.load(tmp_path / "t3-e1.ckpt", weights_only=True)["global_step"] == 2  # limit_train_batches
    again = executor.run_epoch(job(tmp_path / "again", 3, config, 1))
    assert again.value == first.value
    (_, trial_dir, drawn), (_, _, drawn_again) = builder.calls
    assert trial_dir == tmp_path / "log3"
    assert drawn == drawn_again  # the global generators are seeded before the builder runs
    builder.calls.clear()
    costs = executor.frozen_layer_costs([config], (0.25, 1.0))
    assert [call[1] for call in builder.calls] == [None]  # not an epoch of a trial: no trial folder
    assert len(costs) == 1 and costs[0][0] < costs[0][1] == 1.0


def test_the_job_names_the_metric_and_the_cap(hub, tmp_path):
    """An executor built without them takes both from each job: the value, the LR horizon and the module's cap."""
    space = SearchSpace.from_dict(SPACE_SPEC, hub_entries=hub.names)
    executor = InProcessExecutor.from_factories(ImageClassifier, DigitsDataModule, space, hub)
    config = {"hub": "mlp-s", "model.lr": 0.05, "model.dropout": 0.0}
    for trial_id, monitor, cap in ((1, "val_loss", 4), (2, "val_acc", 7)):
        outcome = executor.run_epoch(job(tmp_path, trial_id, config, 1, monitor=monitor, cap=cap))
        assert outcome.error is None and outcome.value == outcome.metrics[monitor]
        saved = torch.load(tmp_path / f"t{trial_id}-e1.ckpt", weights_only=True)
        assert saved["lr_schedulers"][0]["T_max"] == cap and saved["hyper_parameters"]["max_epochs"] == cap
    assert executor.build_trial(config).module.hparams.max_epochs == 20  # outside a job: the module's default


def test_a_job_that_contradicts_the_executor_is_refused_before_training(hub, tmp_path):
    """Built with a monitor and a cap, the executor refuses a job with others instead of silently using its own."""
    space = SearchSpace.from_dict(SPACE_SPEC, hub_entries=hub.names)
    executor = InProcessExecutor.from_factories(ImageClassifier, DigitsDataModule, space, hub, monitor="val_acc", cap=5)
    config = {"hub": "mlp-s", "model.lr": 0.05, "model.dropout": 0.0}
    with pytest.raises(
        FMSError, match=r"^the study monitors 'val_loss' but the executor was built with monitor='val_acc'"
    ):
        executor.run_epoch(job(tmp_path, 1, config, 1, monitor="val_loss"))
    with pytest.raises(FMSError, match=r"^the study's per-trial cap is 3 but the trial builder was built with cap=5"):
        executor.run_epoch(job(tmp_path, 2, config, 1, cap=3))
    assert not list(tmp_path.glob("*.ckpt")) and not (tmp_path / "log1").exists() and not (tmp_path / "log2").exists()
    assert executor.run_epoch(job(tmp_path, 3, config, 1)).error is None  # the executor's own monitor and cap


def test_the_lightning_cli_builder_writes_the_job_s_cap_at_its_key(in_cli_dir):
    from digits import DigitsFineTuner  # recipes/cli/digits.py, importable in in_cli_dir

    from lightning_fms.cli_trials import CLITrialBuilder
    from lightning_fms.lightning_cli import FMSLightningCLI
    from lightning_fms.sweep import read_space_file

    cli = FMSLightningCLI(DigitsFineTuner, DigitsDataModule, args=["--config", "cfg.yaml"], run=False)
    space = read_space_file(str(in_cli_dir / "space.yaml")).space
    config = {"model.pretrained": "weights/cnn-s.safetensors", "model.lr": 0.05}
    free = CLITrialBuilder(cli, space, in_cli_dir, max_epochs_key="model.max_epochs")
    assert free(config, cap=3).module.hparams.max_epochs == 3
    assert free(config, cap=6).module.hparams.max_epochs == 6
    capped = CLITrialBuilder(cli, space, in_cli_dir, cap=5, max_epochs_key="model.max_epochs")
    assert capped(config).module.hparams.max_epochs == capped(config, cap=5).module.hparams.max_epochs == 5
    with pytest.raises(FMSError, match="per-trial cap is 3 but the trial builder was built with cap=5"):
        capped(config, cap=3)
