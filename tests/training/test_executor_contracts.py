"""The executor contract (lightning_fms.testing.executors) run against the executors that ship."""

from __future__ import annotations

import pytest

from lightning_fms.cli_trials import CLITrialBuilder
from lightning_fms.lightning_cli import FMSLightningCLI
from lightning_fms.search.space import SearchSpace
from lightning_fms.sweep import read_space_file
from lightning_fms.testing.executors import ExecutorContract
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.zoo import DigitsDataModule, ImageClassifier

SPACE = {
    "hub": {"type": "hub"},
    "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},  # draws random numbers: the seeder must fix them
}
DIVERGING_LR = 1e30


class TestInProcessExecutor(ExecutorContract):
    """Trials built by a module factory and a datamodule factory."""

    @pytest.fixture(autouse=True)
    def _hub(self, hub):
        self.hub = hub

    def make_executor(self):
        space = SearchSpace.from_dict(SPACE, hub_entries=self.hub.names)
        return InProcessExecutor.from_factories(
            ImageClassifier,
            DigitsDataModule,
            space,
            self.hub,
            monitor="val_acc",
            cap=5,
            datamodule_options={"task": "target"},
            trainer_options={"accelerator": "cpu"},
        )

    def trial_config(self):
        return {"hub": "cnn-s", "model.lr": 0.05, "model.dropout": 0.3}

    def hub_entry(self, config):
        return config["hub"]

    def failing_config(self):
        return {**self.trial_config(), "model.lr": DIVERGING_LR}


class TestLightningCLIExecutor(ExecutorContract):
    """Trials parsed and instantiated by a LightningCLI (recipes/cli), as under ``fit --tuner fms``."""

    @pytest.fixture(autouse=True)
    def _cli_dir(self, in_cli_dir):
        self.cli_dir = in_cli_dir

    def make_executor(self):
        from digits import DigitsFineTuner  # recipes/cli/digits.py, importable in in_cli_dir

        cli = FMSLightningCLI(DigitsFineTuner, DigitsDataModule, args=["--config", "cfg.yaml"], run=False)
        space_file = read_space_file(str(self.cli_dir / "space.yaml"))
        builder = CLITrialBuilder(cli, space_file.space, space_file.base_dir, cap=5, max_epochs_key="model.max_epochs")
        return InProcessExecutor(builder, monitor="val_acc", hub=builder.hub)

    def trial_config(self):
        return {
            "model.pretrained": "weights/cnn-s.safetensors",
            "model.lr": 0.05,
            "model.momentum": 0.5,
            "data.batch_size": 32,
        }

    def hub_entry(self, config):
        return config["model.pretrained"]

    def failing_config(self):
        return {**self.trial_config(), "model.lr": DIVERGING_LR}
