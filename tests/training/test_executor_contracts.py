"""The executor contract (lightning_fms.testing.executors) run against the executors that ship."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar
from unittest import mock

import pytest
import torch

from lightning_fms.cli_trials import CLITrialBuilder
from lightning_fms.lightning_cli import FMSLightningCLI
from lightning_fms.search.space import SearchSpace
from lightning_fms.sweep import read_space_file
from lightning_fms.testing.executors import ExecutorContract
from lightning_fms.training import in_process
from lightning_fms.training.executor import EpochJob, EpochOutcome
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.training.seeder import TrialSeeder
from lightning_fms.zoo import DigitsDataModule, ImageClassifier

SPACE = {
    "hub": {"type": "hub"},
    "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},  # draws random numbers: the seeder must fix them
}
DIVERGING_LR = 1e30


class TestInProcessExecutor(ExecutorContract):
    """Trials built by a module factory and a datamodule factory."""

    executor_class: ClassVar[type[InProcessExecutor]] = InProcessExecutor

    @pytest.fixture(autouse=True)
    def _hub(self, hub):
        self.hub = hub

    def make_executor(self):
        space = SearchSpace.from_dict(SPACE, hub_entries=self.hub.names)
        return self.executor_class.from_factories(
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


# ------------------------------------------------------------------ the suite rejects executors that break it
# Each broken executor is the real InProcessExecutor with one bug, brought in by rewriting the job with
# dataclasses.replace (so new EpochJob fields pass through untouched) or by wrapping run_epoch.


class _IgnoresResumeFrom(InProcessExecutor):
    """Drops ``job.resume_from``: every job trains from the pretrained weights."""

    def run_epoch(self, job: EpochJob) -> EpochOutcome:
        return super().run_epoch(dataclasses.replace(job, resume_from=None))


_real_trainer_for = in_process.trainer_for


def _trainer_without_seeder(*args, **kwargs):
    """The executor's real Trainer, with its TrialSeeder taken out."""
    trainer = _real_trainer_for(*args, **kwargs)
    trainer.callbacks = [callback for callback in trainer.callbacks if not isinstance(callback, TrialSeeder)]
    return trainer


class _WithoutTrialSeeder(InProcessExecutor):
    """Trains without the TrialSeeder: data order and dropout depend on how the epochs were split."""

    def run_epoch(self, job: EpochJob) -> EpochOutcome:
        with mock.patch.object(in_process, "trainer_for", _trainer_without_seeder):
            return super().run_epoch(job)


class _EpochFailed(RuntimeError):
    """What :class:`_RaisesOnAFailedEpoch` raises."""


class _RaisesOnAFailedEpoch(InProcessExecutor):
    """Raises the epoch's error instead of returning it."""

    def run_epoch(self, job: EpochJob) -> EpochOutcome:
        outcome = super().run_epoch(job)
        if outcome.error is not None:
            raise _EpochFailed(outcome.error)
        return outcome


class _CheckpointsAFailedEpoch(InProcessExecutor):
    """Returns the error but leaves a checkpoint behind, which a resumed study would read."""

    def run_epoch(self, job: EpochJob) -> EpochOutcome:
        outcome = super().run_epoch(job)
        if outcome.error is not None:
            torch.save({"epoch": job.epoch}, job.checkpoint_out)
        return outcome


class _AlwaysRecordsWeights(InProcessExecutor):
    """Records the weights whether the job asks or not."""

    def run_epoch(self, job: EpochJob) -> EpochOutcome:
        return super().run_epoch(dataclasses.replace(job, record_weights=True))


class _IgnoresTheTrainableFraction(InProcessExecutor):
    """Drops ``job.trainable_fraction``: every epoch trains all layer units."""

    def run_epoch(self, job: EpochJob) -> EpochOutcome:
        return super().run_epoch(dataclasses.replace(job, trainable_fraction=None))


def contract_for(executor_class: type[InProcessExecutor], hub) -> TestInProcessExecutor:
    """The in-process contract run against ``executor_class``."""
    contract = TestInProcessExecutor()
    contract.hub = hub
    contract.executor_class = executor_class  # type: ignore[misc]
    return contract


def failing_statement(failure: pytest.ExceptionInfo[AssertionError]) -> str:
    """The source of the assertion that failed (the contract's asserts are not rewritten by pytest)."""
    return str(failure.traceback[-1].statement)


def test_the_suite_rejects_an_executor_that_ignores_resume_from(hub, tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as failure:
        contract_for(_IgnoresResumeFrom, hub).test_one_plus_one_plus_one_epochs_equal_three_straight_epochs(tmp_path)
    assert "swapped_state" in failing_statement(failure)


def test_the_suite_rejects_an_executor_without_the_trial_seeder(hub, tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as failure:
        contract_for(_WithoutTrialSeeder, hub).test_one_plus_one_plus_one_epochs_equal_three_straight_epochs(tmp_path)
    assert "split[-1].value == straight.value" in failing_statement(failure)


def test_the_suite_rejects_an_executor_that_raises_on_a_failed_epoch(hub, tmp_path: Path) -> None:
    contract = contract_for(_RaisesOnAFailedEpoch, hub)
    with pytest.raises(_EpochFailed):
        contract.test_a_failing_epoch_is_an_error_outcome_not_an_exception(tmp_path)


def test_the_suite_rejects_an_executor_that_checkpoints_a_failed_epoch(hub, tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as failure:
        contract_for(_CheckpointsAFailedEpoch, hub).test_a_failing_epoch_is_an_error_outcome_not_an_exception(tmp_path)
    assert "checkpoint_out.exists()" in failing_statement(failure)


def test_the_suite_rejects_an_executor_that_records_weights_unasked(hub, tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as failure:
        contract_for(_AlwaysRecordsWeights, hub).test_recorded_weights_load_into_the_pretrained_module(tmp_path)
    assert "silent.weights is None" in failing_statement(failure)


def test_the_suite_rejects_an_executor_that_ignores_the_trainable_fraction(hub, tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as failure:
        contract_for(_IgnoresTheTrainableFraction, hub).test_the_trainable_fraction_of_the_job_is_honoured(tmp_path)
    assert "changed & frozen" in failing_statement(failure)
