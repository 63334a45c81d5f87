"""The frozen-layer fidelity in real studies: costs charged, frozen weights unchanged, resumption decides the same."""

import csv

import pytest
import torch
from safetensors.torch import load_file

from lightning_fms import FMSTuner, SearchSpace
from lightning_fms.frozen.units import layer_units
from lightning_fms.observer import StudyObserver
from lightning_fms.zoo import DigitsDataModule, ImageClassifier


def test_tuner_trains_frozen_epochs_with_the_input_side_unchanged(hub, tmp_path, fast_surrogate):
    space = SearchSpace.from_dict(
        {"hub": {"type": "hub"}, "model.lr": {"type": "float", "low": 0.05, "high": 0.2}}, hub_entries=["resnet-xs"]
    )
    tuner = FMSTuner(
        ImageClassifier,
        DigitsDataModule,
        space,
        hub=hub,
        study_dir=tmp_path / "study",
        budget=3,
        monitor="val_acc",
        max_epochs_per_trial=3,
        module_options={"reset_head": True},
        datamodule_options={"task": "target", "batch_size": 64},
        surrogate_options=fast_surrogate,
        frozen_layers=[0.2],
        weights="stats",
        num_startup_trials=1,
        progress=False,
    )
    costs = tuner.frozen_layers.costs["resnet-xs"]
    assert tuner.frozen_layers.fractions == (0.2, 1.0) and costs[0] < 1.0 == costs[1]
    result = tuner.run()
    opt = tuner.optimizer
    assert opt.budget_spent <= 3.0 + 1e-9 and opt.epochs_spent >= 3
    charged = [costs[opt.frozen_layers.fractions.index(f)] for t in opt.trials.values() for f in t.fractions]
    assert opt.budget_spent == pytest.approx(sum(charged))
    with open(tmp_path / "study" / "trajectory.csv") as f:
        rows = list(csv.DictReader(f))
    assert {float(r["trainable_fraction"]) for r in rows} <= {0.2, 1.0}
    assert float(rows[-1]["budget_spent"]) == pytest.approx(opt.budget_spent)
    # In an epoch at fraction 0.2 (1 of 5 units: the head) every other weight stays as it was.
    frozen_epochs = [(t.id, k) for t in opt.trials.values() for k, f in enumerate(t.fractions, start=1) if f == 0.2]
    assert frozen_epochs, "the cost-aware searcher never chose a frozen epoch"
    trial_id, epoch = frozen_epochs[0]
    after = load_file(str(tmp_path / "study" / "weights" / f"trial-{trial_id}-{epoch}.safetensors"))
    if epoch == 1:
        before = hub.build("resnet-xs").state_dict()
    else:
        before = load_file(str(tmp_path / "study" / "weights" / f"trial-{trial_id}-{epoch - 1}.safetensors"))
    units = layer_units(hub.build("resnet-xs"))
    frozen = {n for u in units[:-1] for n in u.parameter_names}
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed & set(units[-1].parameter_names) and not changed & frozen
    # batch-norm statistics of the frozen units did not move either
    assert not {n for n in changed if "running_" in n}
    assert result.best_value is not None


def test_a_resumed_two_fidelity_study_makes_the_same_decisions(hub, tmp_path, fast_surrogate):
    class CrashAfter(StudyObserver):
        def __init__(self, epochs):
            self.epochs = epochs

        def on_epoch_end(self, study, trial, epoch, metrics):
            if study.epochs_spent == self.epochs:
                raise KeyboardInterrupt  # as if the process died right after an epoch was committed

    def make(study_dir, budget, observers=()):
        space = SearchSpace.from_dict(
            {"hub": {"type": "hub"}, "model.lr": {"type": "float", "low": 0.01, "high": 0.3, "log": True}},
            hub_entries=["mlp-xs", "cnn-xs"],
        )
        return FMSTuner(
            ImageClassifier,
            DigitsDataModule,
            space,
            hub=hub,
            study_dir=study_dir,
            budget=budget,
            monitor="val_acc",
            max_epochs_per_trial=3,
            datamodule_options={"task": "target", "batch_size": 64},
            surrogate_options=fast_surrogate,
            num_fresh_candidates=8,
            frozen_layers=True,
            progress=False,
            observers=observers,
        )

    straight = make(tmp_path / "straight", 3)
    straight.run()
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "resumed", 3, observers=[CrashAfter(3)]).run()
    resumed = make(tmp_path / "resumed", 3)
    resumed.run()

    def decisions(tuner):
        keys = ("trial", "epoch", "trainable_fraction", "cost", "value", "budget_spent")
        return [tuple(d[k] for k in keys) for d in tuner.optimizer.decisions]

    assert decisions(resumed) == decisions(straight)
    assert any(d[2] < 1.0 for d in decisions(straight))
