"""Pending epochs: the targets each strategy makes up, and that claims see the epochs in flight."""

from __future__ import annotations

import pytest
import torch

from lightning_fms.errors import FMSError
from lightning_fms.search.optimizer import FreezeThawOptimizer
from lightning_fms.search.pending import check_pending, pending_targets
from lightning_fms.search.searcher import build_searcher
from lightning_fms.search.space import SearchSpace

SPACE = SearchSpace.from_dict({"lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}})


def _previous():
    return torch.tensor([0.5, 0.7]), torch.tensor([0.04, 0.01])


def test_constant_liar_takes_the_lowest_observed_score():
    assert pending_targets("constant_liar", [0.3, 0.1, 0.9], 2, _previous, seed=0) == [[0.1, 0.1]]


def test_kriging_believer_takes_the_previous_mean_and_falls_back_before_a_first_fit():
    assert pending_targets("kriging_believer", [0.3], 2, _previous, seed=0) == [pytest.approx([0.5, 0.7])]
    assert pending_targets("kriging_believer", [0.3], 2, None, seed=0) == [[0.3, 0.3]]


def test_fantasies_draw_around_the_previous_posterior_reproducibly():
    draws = pending_targets("fantasies", [0.3], 2, _previous, seed=7, fantasies=200)
    assert len(draws) == 200 and draws == pending_targets("fantasies", [0.3], 2, _previous, seed=7, fantasies=200)
    first = torch.tensor([d[0] for d in draws])
    assert abs(float(first.mean()) - 0.5) < 0.05 and abs(float(first.std()) - 0.2) < 0.05


@pytest.mark.parametrize(("strategy", "fantasies"), [("optimistic", 4), ("fantasies", 0)])
def test_bad_settings_are_refused_in_one_line(strategy, fantasies):
    with pytest.raises(FMSError, match="pending strategy|fantasies"):
        check_pending(strategy, fantasies)
    with pytest.raises(FMSError):
        build_searcher("gp", SPACE, 4, pending=strategy, fantasies=fantasies)


@pytest.mark.parametrize("strategy", ["constant_liar", "kriging_believer", "fantasies", "ignore"])
def test_a_claim_decides_with_the_epochs_in_flight_as_pending_rows(strategy):
    searcher = build_searcher("gp", SPACE, 4, pending=strategy, fantasies=2)
    opt = FreezeThawOptimizer(SPACE, searcher, budget=20, max_epochs_per_trial=4, num_startup_trials=2)
    for _ in range(3):  # three trials with one epoch each, then two claims in flight
        s = opt.claim({"w": 0})
        opt.complete(s.trial_id, s.epoch, 0.1 * (s.trial_id + 1))
    first = opt.claim({"w": 1})
    assert len(opt.selection_context().pending) == 1
    plan = searcher.fit_plan(opt.selection_context(), seed=0)
    observed = 3
    assert all(len(t) == observed + (0 if strategy == "ignore" else 1) for t in plan.targets)
    assert len(plan.targets) == (2 if strategy == "fantasies" else 1)
    if strategy == "constant_liar":
        assert float(plan.targets[0][-1]) == pytest.approx(0.1)
    second = opt.claim({"w": 2})
    assert second.trial_id != first.trial_id
    assert opt.decisions == [] or opt.decisions[-1]["decision"] < second.decision
    info = dict(opt.running[second.trial_id].decision.diagnostics)
    assert info.get("pending") == (None if strategy == "ignore" else 1.0)


@pytest.mark.parametrize("strategy", ["kriging_believer", "fantasies"])
def test_a_posterior_far_from_the_data_gives_bounded_finite_lies(strategy):
    def runaway():  # an ill-conditioned fit extrapolating wildly: beyond float32 at one row, far below at the other
        return torch.tensor([1e39, -1e12], dtype=torch.float64), torch.tensor([1e30, 0.0], dtype=torch.float64)

    lies = pending_targets(strategy, [0.2, 0.6, 0.9], 2, runaway, seed=0, fantasies=3)
    targets = torch.tensor([[0.2, 0.6, 0.9, *lie] for lie in lies], dtype=torch.float32)
    assert bool(torch.isfinite(targets).all())
    assert float(targets.max()) == pytest.approx(1.9) and float(targets.min()) == pytest.approx(-0.8)
