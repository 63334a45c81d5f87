"""FMSTuner drives any Executor: everything an epoch needs travels on the job, nothing is set on the executor."""

from __future__ import annotations

import pytest

from lightning_fms import FMSTuner, SearchSpace
from lightning_fms.errors import FMSError
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.zoo import DigitsDataModule, ImageClassifier

SPACE = {"hub": {"type": "hub"}, "model.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}}


class DelegatingExecutor:
    """An executor that is no InProcessExecutor (as a Ray executor would be): it forwards and records the jobs."""

    def __init__(self, inner):
        self.inner = inner
        self.jobs = []

    def run_epoch(self, job):
        self.jobs.append(job)
        return self.inner.run_epoch(job)

    def pretrained_module(self, entry):
        return self.inner.pretrained_module(entry)

    def frozen_layer_costs(self, configs, fractions):
        return self.inner.frozen_layer_costs(configs, fractions)


def _space(hub):
    return SearchSpace.from_dict(SPACE, hub_entries=["mlp-s", "resnet-xs"])


def _inner(hub):
    return InProcessExecutor.from_factories(
        ImageClassifier,
        DigitsDataModule,
        _space(hub),
        hub,
        monitor="val_acc",
        cap=2,
        datamodule_options={"task": "target", "batch_size": 64},
        trainer_options={"accelerator": "cpu"},
    )


def test_the_tuner_runs_an_executor_of_its_own_kind(hub, tmp_path, fast_surrogate):
    executor = DelegatingExecutor(_inner(hub))
    tuner = FMSTuner(
        executor=executor,
        space=_space(hub),
        hub=hub,
        study_dir=tmp_path / "study",
        budget=3,
        monitor="val_acc",
        max_epochs_per_trial=2,
        weights="stats",
        frozen_layers=[0.5],
        num_fresh_candidates=8,
        num_startup_trials=1,
        surrogate_options=fast_surrogate,
        progress=False,
    )
    result = tuner.run()
    assert result.best_value is not None and executor.jobs
    assert all(job.record_weights for job in executor.jobs)  # the featurizer reads weights
    assert {job.trainable_fraction for job in executor.jobs} <= {0.5, 1.0}
    decisions = tuner.optimizer.decisions
    assert [(job.trial_id, job.epoch) for job in executor.jobs] == [(d["trial"], d["epoch"]) for d in decisions]
    assert {(job.monitor, job.cap) for job in executor.jobs} == {("val_acc", 2)}  # the tuner's, on every job
    assert len(list((tmp_path / "study" / "weights").glob("trial-*.safetensors"))) == len(executor.jobs)
    assert len(list((tmp_path / "study" / "weights").glob("hub-*.safetensors"))) == 2  # the space's entries


def test_without_a_featurizer_no_weights_are_asked_for(hub, tmp_path):
    executor = DelegatingExecutor(_inner(hub))
    FMSTuner(
        executor=executor,
        space=_space(hub),
        hub=hub,
        study_dir=tmp_path / "study",
        budget=2,
        monitor="val_acc",
        max_epochs_per_trial=2,
        searcher="random",
        progress=False,
    ).run()
    assert executor.jobs and not any(job.record_weights for job in executor.jobs)
    assert all(job.trainable_fraction is None for job in executor.jobs)


def test_an_executor_or_both_factories(hub, tmp_path):
    common = {"study_dir": tmp_path / "study", "budget": 2, "monitor": "val_acc", "hub": hub, "progress": False}
    executor = _inner(hub)
    with pytest.raises(FMSError, match="needs an executor= or a module factory and a datamodule factory"):
        FMSTuner(space=_space(hub), **common)
    with pytest.raises(FMSError, match="needs an executor= or"):
        FMSTuner(ImageClassifier, space=_space(hub), **common)
    with pytest.raises(FMSError, match="needs a search space"):
        FMSTuner(executor=executor, **common)
    with pytest.raises(FMSError, match="module_factory, datamodule_factory configure the default executor"):
        FMSTuner(ImageClassifier, DigitsDataModule, _space(hub), executor=executor, **common)
    with pytest.raises(FMSError, match="trainer_options, hub_argument configure the default executor"):
        FMSTuner(executor=executor, space=_space(hub), trainer_options={"precision": 32}, hub_argument="x", **common)
    assert FMSTuner(executor=executor, space=_space(hub), **common).executor is executor
    built = FMSTuner(ImageClassifier, DigitsDataModule, _space(hub), **common).executor
    assert isinstance(built, InProcessExecutor) and built.weights_attribute == "net"


@pytest.mark.parametrize(
    ("tuner_args", "refusal"),
    [
        (
            {"monitor": "val_loss", "mode": "min"},
            "the study monitors 'val_loss' but the executor was built with monitor='val_acc'",
        ),
        ({"max_epochs_per_trial": 3}, "the study's per-trial cap is 3 but the trial builder was built with cap=2"),
    ],
)
def test_a_tuner_and_an_executor_that_disagree_stop_before_training(hub, tmp_path, tuner_args, refusal):
    """The executor is built for val_acc and cap 2: a study of another metric or cap is refused, not run."""
    executor = DelegatingExecutor(_inner(hub))
    settings = {"monitor": "val_acc", "max_epochs_per_trial": 2, **tuner_args}
    tuner = FMSTuner(
        executor=executor, space=_space(hub), hub=hub, study_dir=tmp_path / "study", budget=2, searcher="random",
        progress=False, **settings,
    )  # fmt: skip
    with pytest.raises(FMSError, match=f"^{refusal}"):
        tuner.run()
    assert len(executor.jobs) == 1 and not list((tmp_path / "study").rglob("*.ckpt"))
    assert tuner.optimizer.epochs_spent == 0
