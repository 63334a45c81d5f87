"""The executor contract: tests every :class:`~lightning_fms.training.executor.Executor` must pass.

The tuner's promises rest on them: a study resumed after a crash makes the same decisions as one never
interrupted only if an epoch trains the same way however the epochs of a trial were split into jobs; the
study goes on past a failing trial only if the failure comes back as :attr:`EpochOutcome.error`; the
frozen-layer fidelity charges less only for epochs that really train fewer layer units; the study optimises
its own metric only if the executor records the one its jobs name.

Use it as a pytest base class (it needs pytest; the test methods take pytest's ``tmp_path``)::

    from lightning_fms.testing.executors import ExecutorContract

    class TestMyExecutor(ExecutorContract):
        def make_executor(self):
            return MyExecutor(...)

        def trial_config(self):
            return {"hub": "cnn-s", "model.lr": 0.05}

        def hub_entry(self, config):
            return config["hub"]

The class name must not start with ``Test`` so that pytest collects only the subclasses.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lightning_fms.frozen.levels import units_for_fraction
from lightning_fms.frozen.units import layer_units
from lightning_fms.training.executor import EpochJob, EpochOutcome, Executor

__all__ = ["ExecutorContract", "assert_same_tensors"]


def assert_same_tensors(left: Any, right: Any, where: str = "") -> None:
    """Assert two nested structures (dicts, lists, tensors, numbers) are equal, tensors bit for bit.

    Raises:
        AssertionError: naming the first place where they differ.
    """
    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        assert isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor), f"{where}: tensor vs not"
        assert left.dtype == right.dtype and left.shape == right.shape, f"{where}: {left.dtype}{list(left.shape)}"
        assert torch.equal(left, right), f"{where}: tensors differ"
    elif isinstance(left, dict):
        assert isinstance(right, dict) and set(left) == set(right), f"{where}: keys differ"
        for key in left:
            assert_same_tensors(left[key], right[key], f"{where}/{key}")
    elif isinstance(left, (list, tuple)):
        assert isinstance(right, (list, tuple)) and len(left) == len(right), f"{where}: lengths differ"
        for index, (a, b) in enumerate(zip(left, right)):
            assert_same_tensors(a, b, f"{where}[{index}]")
    else:
        same = left == right or (isinstance(left, float) and math.isnan(left) and math.isnan(right))
        assert same, f"{where}: {left!r} != {right!r}"


class ExecutorContract:
    """The test suite of an executor; subclass it and implement the hooks.

    Hooks:
        make_executor: A fresh executor (called once per test).
        trial_config: A configuration that trains successfully (its learning rate must move the weights).
        hub_entry: The hub entry a configuration starts from (``None``: no hub; the weight and frozen-layer
            tests are then skipped).
        failing_config: A configuration whose training fails (diverges or raises), or ``None``.

    Every job of the contract monitors :attr:`monitor` with per-trial cap :attr:`cap` (a study's ``monitor``
    and ``max_epochs_per_trial``); set them on the subclass when the executor's trials log another metric.
    """

    # ------------------------------------------------------------------ hooks
    def make_executor(self) -> Executor:
        """A fresh executor under test."""
        raise NotImplementedError

    def trial_config(self) -> dict[str, Any]:
        """A configuration that trains successfully."""
        raise NotImplementedError

    def hub_entry(self, config: dict[str, Any]) -> str | None:
        """The hub entry ``config`` starts from (``None`` without a hub)."""
        return None

    def failing_config(self) -> dict[str, Any] | None:
        """A configuration whose first epoch fails (``None``: only the executor-independent failure is tried)."""
        return None

    #: The metric and the per-trial cap of the contract's jobs (a study's ``monitor`` and
    #: ``max_epochs_per_trial``); override them when the executor under test is built for others.
    monitor = "val_acc"
    cap = 5

    # ------------------------------------------------------------------ helpers
    def job(
        self,
        folder: Path,
        config: dict[str, Any],
        epoch: int,
        resume_from: Path | None = None,
        trial_id: int = 7,
        **options: Any,
    ) -> EpochJob:
        """The job of ``epoch`` of trial ``trial_id``, writing ``folder/t<trial>-e<epoch>.ckpt``."""
        fields: dict[str, Any] = {"seed": 0, "monitor": self.monitor, "cap": self.cap, **options}
        return EpochJob(
            trial_id=trial_id,
            config=dict(config),
            epoch=epoch,
            resume_from=resume_from,
            checkpoint_out=folder / f"t{trial_id}-e{epoch}.ckpt",
            log_dir=folder / f"trial-{trial_id}",
            **fields,
        )

    @staticmethod
    def succeeded(outcome: EpochOutcome) -> EpochOutcome:
        """``outcome``, after asserting it holds no error and a finite value."""
        assert outcome.error is None, outcome.error
        assert math.isfinite(outcome.value), outcome.value
        return outcome

    @staticmethod
    def checkpoint(path: Path) -> dict[str, Any]:
        """A checkpoint the executor wrote, read as the tuner reads it (no unpickling)."""
        return torch.load(path, map_location="cpu", weights_only=True)

    def _pretrained(self, executor: Executor, config: dict[str, Any]) -> torch.nn.Module:
        entry = self.hub_entry(config)
        module = executor.pretrained_module(entry) if entry is not None else None
        if module is None:
            import pytest

            pytest.skip("the executor under test has no hub")
        return module

    # ------------------------------------------------------------------ the contract
    def test_one_plus_one_plus_one_epochs_equal_three_straight_epochs(self, tmp_path: Path) -> None:
        """Three single-epoch jobs, each resumed from the last one's checkpoint, equal one 3-epoch job bit for bit.

        Another trial's epochs run in between, in the same executor, so no state may leak between jobs.
        """
        executor = self.make_executor()
        config = self.trial_config()
        split_dir, straight_dir = tmp_path / "split", tmp_path / "straight"
        resume, other = None, None
        split = []
        for epoch in (1, 2, 3):
            job = self.job(split_dir, config, epoch, resume, record_weights=True)
            split.append(self.succeeded(executor.run_epoch(job)))
            resume = job.checkpoint_out
            self.succeeded(executor.run_epoch(self.job(split_dir, config, epoch, other, trial_id=8)))
            other = split_dir / f"t8-e{epoch}.ckpt"
        straight = self.succeeded(executor.run_epoch(self.job(straight_dir, config, 3, None, record_weights=True)))
        assert split[-1].value == straight.value
        assert_same_tensors(split[-1].weights, straight.weights, "recorded weights")
        after_split, after_straight = self.checkpoint(resume), self.checkpoint(straight_dir / "t7-e3.ckpt")
        assert_same_tensors(after_split["state_dict"], after_straight["state_dict"], "state_dict")
        assert_same_tensors(after_split["optimizer_states"], after_straight["optimizer_states"], "optimizer_states")
        assert after_split["epoch"] == after_straight["epoch"] == 3
        # trial 8 trained with other seeds: the comparison above could have failed
        other_state = self.checkpoint(other)["state_dict"]
        assert any(not torch.equal(v, other_state[k]) for k, v in after_split["state_dict"].items())
        # and a job continues from the checkpoint it is given, not from scratch
        swapped = self.job(tmp_path / "swapped", config, 2, split_dir / "t8-e1.ckpt")
        self.succeeded(executor.run_epoch(swapped))
        swapped_state = self.checkpoint(swapped.checkpoint_out)["state_dict"]
        second = self.checkpoint(split_dir / "t7-e2.ckpt")["state_dict"]
        assert any(not torch.equal(v, swapped_state[k]) for k, v in second.items())

    def test_a_failing_epoch_is_an_error_outcome_not_an_exception(self, tmp_path: Path) -> None:
        """A job that fails returns ``EpochOutcome.error`` and writes no checkpoint; the executor goes on."""
        executor = self.make_executor()
        config = self.trial_config()
        garbage = tmp_path / "garbage.ckpt"
        garbage.write_bytes(b"this is not a checkpoint" * 64)
        jobs = [self.job(tmp_path, config, 2, garbage, trial_id=1)]
        failing = self.failing_config()
        if failing is not None:
            jobs.append(self.job(tmp_path, failing, 1, None, trial_id=2))
        for job in jobs:
            outcome = executor.run_epoch(job)
            assert isinstance(outcome.error, str) and outcome.error, outcome
            assert not job.checkpoint_out.exists()
        self.succeeded(executor.run_epoch(self.job(tmp_path, config, 1, None, trial_id=3)))

    def test_the_job_names_the_metric(self, tmp_path: Path) -> None:
        """The value is the job's monitored metric; a job monitoring a metric nobody logs stops the study.

        An executor cannot record a metric of its own choosing: it records the job's, or refuses the job with
        :class:`~lightning_fms.errors.FMSError`, before writing a checkpoint.
        """
        import pytest

        from lightning_fms.errors import FMSError

        executor = self.make_executor()
        config = self.trial_config()
        outcome = self.succeeded(executor.run_epoch(self.job(tmp_path, config, 1, trial_id=1)))
        if outcome.metrics:
            assert outcome.value == outcome.metrics[self.monitor]
        unlogged = self.job(tmp_path, config, 1, trial_id=2, monitor="metric_that_is_never_logged")
        with pytest.raises(FMSError):
            executor.run_epoch(unlogged)
        assert not unlogged.checkpoint_out.exists()

    def test_recorded_weights_load_into_the_pretrained_module(self, tmp_path: Path) -> None:
        """``record_weights`` on the job returns weights with the keys of ``pretrained_module``; off, none."""
        executor = self.make_executor()
        config = self.trial_config()
        pretrained = self._pretrained(executor, config)
        silent = self.succeeded(executor.run_epoch(self.job(tmp_path, config, 1, trial_id=1)))
        assert silent.weights is None
        recorded = self.succeeded(executor.run_epoch(self.job(tmp_path, config, 1, trial_id=2, record_weights=True)))
        assert recorded.weights is not None
        pretrained.load_state_dict(recorded.weights, strict=True)
        assert all(t.device.type == "cpu" for t in recorded.weights.values())

    def test_the_trainable_fraction_of_the_job_is_honoured(self, tmp_path: Path) -> None:
        """An epoch at a small trainable fraction leaves the input-side layer units as they were pretrained."""
        executor = self.make_executor()
        config = self.trial_config()
        pretrained = self._pretrained(executor, config)
        units = layer_units(pretrained)
        assert len(units) >= 2, "the contract needs a network of at least two layer units"
        fraction = 0.01
        k = units_for_fraction(fraction, len(units))
        frozen = {name for unit in units[: len(units) - k] for name in unit.parameter_names}
        trainable = {name for unit in units[len(units) - k :] for name in unit.parameter_names}
        before = pretrained.state_dict()
        for trial_id, job_fraction in ((1, fraction), (2, None)):
            job = self.job(tmp_path, config, 1, trial_id=trial_id, trainable_fraction=job_fraction, record_weights=True)
            weights = self.succeeded(executor.run_epoch(job)).weights
            assert weights is not None
            changed = {name for name in frozen | trainable if not torch.equal(weights[name], before[name])}
            if job_fraction is not None:
                assert not changed & frozen, sorted(changed & frozen)
                assert changed & trainable
            else:  # all units train: the frozen ones above were held back by the fraction
                assert changed & frozen
