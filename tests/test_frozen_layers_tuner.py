"""The frozen-layer fidelity in the optimizer and the tuner: levels, thaw-only, cost accounting, frozen weights."""

import csv
import math

import pytest
import torch
from conftest import FAST_SURROGATE
from safetensors.torch import load_file

from lightning_fms import FMSError, FMSTuner, FreezeThawOptimizer, SearchSpace
from lightning_fms.frozen.costs import fraction_costs
from lightning_fms.frozen.levels import FrozenLayers, check_fractions, units_for_fraction
from lightning_fms.frozen.units import layer_units
from lightning_fms.observer import StudyObserver
from lightning_fms.search.searcher import Searcher, Selection
from lightning_fms.zoo import DigitsDataModule, ImageClassifier, TinyResNet

SPACE = {
    "model.lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
    "model.width": {"type": "int", "low": 1, "high": 8},
}
LEVELS = FrozenLayers((0.5, 1.0), {"": (0.4, 1.0)})


class CheapestFirst(Searcher):
    """Resume the oldest paused trial at its cheapest allowed level, else start a fresh one at the cheapest."""

    def select(self, context, candidates, seed):
        order = sorted(range(len(candidates)), key=lambda i: (candidates[i].trial_id is None, candidates[i].cost))
        return Selection(order[0])


class ThawAtEpochTwo(Searcher):
    """Trial 0 first: epoch 1 at the lowest fraction, later epochs fully; then whatever comes first."""

    def select(self, context, candidates, seed):
        for i, c in enumerate(candidates):
            wanted = min(x.fraction for x in candidates) if c.epoch == 1 else 1.0
            if c.fraction == wanted and (c.trial_id == 0 or (c.trial_id is None and not context.trials)):
                return Selection(i)
        return Selection(0)


def run(opt):
    while (s := opt.ask()) is not None:
        opt.tell(s.trial_id, s.epoch, 1.0 - math.exp(-s.epoch * s.config["model.lr"]) * (2.0 - s.fraction))
    return opt


def test_check_fractions():
    assert check_fractions(None) is None and check_fractions(False) is None
    assert check_fractions(True) == (0.25, 0.5, 1.0)
    assert check_fractions([0.5, 0.3]) == (0.3, 0.5, 1.0)
    for bad in (0.0, 1.5, "0.5", [True]):
        with pytest.raises(FMSError, match="frozen_layers"):
            check_fractions([bad] if not isinstance(bad, list) else bad)
    with pytest.raises(FMSError, match="frozen_layers must be"):
        check_fractions("yes")
    assert [units_for_fraction(f, 5) for f in (0.2, 0.25, 0.5, 1.0)] == [1, 2, 3, 5]


def test_budget_counts_full_epoch_equivalents_and_trials_only_thaw():
    opt = FreezeThawOptimizer(
        SearchSpace.from_dict(SPACE),
        CheapestFirst(),
        budget=4,
        max_epochs_per_trial=3,
        num_startup_trials=0,
        frozen_layers=LEVELS,
    )
    run(opt)
    # Every epoch at fraction 0.5 costs 0.4: ten of them fit into 4 full-epoch equivalents, not four.
    assert opt.epochs_spent == 10 and opt.budget_spent == pytest.approx(4.0)
    assert all(d["trainable_fraction"] == 0.5 and d["cost"] == 0.4 for d in opt.decisions)
    assert all(t.fractions == [0.5] * t.epochs for t in opt.trials.values())


def test_candidates_offer_every_level_but_never_refreeze():
    opt = FreezeThawOptimizer(
        SearchSpace.from_dict(SPACE),
        ThawAtEpochTwo(),
        budget=3,
        max_epochs_per_trial=3,
        num_startup_trials=0,
        num_fresh_candidates=2,
        frozen_layers=LEVELS,
    )
    first = opt.candidates(0)
    assert sorted((c.fraction, c.cost) for c in first) == [(0.5, 0.4), (0.5, 0.4), (1.0, 1.0), (1.0, 1.0)]
    run(opt)
    trial = opt.trials[0]
    assert trial.fractions == [0.5, 1.0, 1.0]
    # Once thawed to 1.0 the paused trial is offered at 1.0 only.
    assert {c.fraction for c in opt.candidates(99) if c.trial_id == 0} <= {1.0}
    # then a fresh trial at 0.5 (0.4) still fits, after which 0.2 is left and nothing fits
    assert opt.budget_spent == pytest.approx(0.4 + 1.0 + 1.0 + 0.4) and opt.epochs_spent == 4


def test_a_candidate_that_would_overrun_the_budget_is_not_offered():
    opt = FreezeThawOptimizer(
        SearchSpace.from_dict(SPACE), CheapestFirst(), budget=1, max_epochs_per_trial=3, frozen_layers=LEVELS
    )
    run(opt)
    # 0.4 + 0.4 spent; 0.2 is left, less than any epoch costs: the study ends below the budget, never above it.
    assert opt.budget_spent == pytest.approx(0.8) and opt.epochs_spent == 2
    assert opt.ask() is None


def test_state_round_trip_keeps_fractions_and_refuses_other_levels():
    def make(levels=LEVELS):
        return FreezeThawOptimizer(
            SearchSpace.from_dict(SPACE), CheapestFirst(), budget=3, max_epochs_per_trial=3, frozen_layers=levels
        )

    opt = make()
    for _ in range(4):
        s = opt.ask()
        opt.tell(s.trial_id, s.epoch, 0.5)
    state = opt.state_dict()
    again = make()
    again.load_state_dict(state)
    assert again.budget_spent == pytest.approx(opt.budget_spent)
    assert {t.id: t.fractions for t in again.trials.values()} == {t.id: t.fractions for t in opt.trials.values()}
    with pytest.raises(FMSError, match="frozen_layers"):
        make(FrozenLayers((0.25, 1.0), {"": (0.2, 1.0)})).load_state_dict(state)
    with pytest.raises(FMSError, match="frozen_layers"):
        make(None).load_state_dict(state)


def test_cost_model_counts_only_the_backward_of_trainable_units():
    torch.manual_seed(0)
    net = TinyResNet(width=8, num_classes=5)
    module = ImageClassifier(net, lr=0.1)
    batch = (torch.rand(16, 1, 8, 8), torch.randint(0, 5, (16,)))
    n, costs = fraction_costs(module, net, batch, (0.2, 0.6, 1.0))
    assert n == len(layer_units(net)) == 5
    assert costs[-1] == 1.0 and 0.0 < costs[0] < costs[1] < 1.0
    # The measurement leaves the network as it was: everything trainable, in train mode.
    assert all(p.requires_grad for p in net.parameters()) and module.training


def test_tuner_trains_frozen_epochs_with_the_input_side_unchanged(hub, tmp_path):
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
        surrogate_options=FAST_SURROGATE,
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


def test_a_resumed_two_fidelity_study_makes_the_same_decisions(hub, tmp_path):
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
            surrogate_options=FAST_SURROGATE,
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
