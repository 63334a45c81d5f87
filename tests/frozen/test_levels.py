"""Frozen-layer levels and the optimizer: the fractions offered, thaw-only trials, budgets in full-epoch equivalents."""

import math

import pytest

from lightning_fms import FMSError, FreezeThawOptimizer, SearchSpace
from lightning_fms.frozen.levels import FrozenLayers, check_fractions, units_for_fraction
from lightning_fms.search.searcher import Searcher, Selection

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
