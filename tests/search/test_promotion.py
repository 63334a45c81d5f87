"""The promotion mix continues the best paused trial of the highest rung."""

from __future__ import annotations

import pytest

from lightning_fms.search.promotion import promotion_index, rung_of
from lightning_fms.search.rows import Candidate
from lightning_fms.search.trial import Trial, TrialStatus


@pytest.mark.parametrize(("epochs", "rung"), [(1, 0), (2, 0), (3, 1), (8, 1), (9, 2), (26, 2), (27, 3)])
def test_rungs_are_powers_of_three(epochs, rung):
    assert rung_of(epochs) == rung


def _trial(trial_id: int, values: list[float]) -> Trial:
    trial = Trial(id=trial_id, config={"lr": float(trial_id)})
    trial.values = list(values)
    return trial


def test_the_best_trial_of_the_highest_rung_is_continued():
    trials = {
        0: _trial(0, [0.9]),
        1: _trial(1, [0.5, 0.6, 0.7]),
        2: _trial(2, [0.4, 0.5, 0.65]),
        3: _trial(3, [0.95, 0.99]),
    }
    candidates = [Candidate(None, {"lr": 9.0}, 1)] + [Candidate(t.id, t.config, t.epochs + 1) for t in trials.values()]
    chosen = candidates[promotion_index(candidates, trials, "max")]
    assert chosen.trial_id == 1  # rung 1 (3 epochs) beats rung 0 even though trial 3 scores higher
    assert candidates[promotion_index(candidates, trials, "min")].trial_id == 2  # minimising


def test_no_paused_trial_means_no_promotion():
    assert promotion_index([Candidate(None, {"lr": 1.0}, 1)], {}, "max") is None


def test_the_searcher_promotes_with_its_probability(tiny_space_and_trials):
    """p=1 always promotes (no surrogate time), p=0 never does."""
    from lightning_fms.search.searcher import SelectionContext, build_searcher

    space, trials = tiny_space_and_trials
    candidates = [Candidate(t.id, t.config, t.epochs + 1) for t in trials.values()]
    candidates.append(Candidate(None, {"lr": 0.05}, 1))
    context = SelectionContext(space=space, trials=trials, mode="max", cap=10)
    always = build_searcher("gp", space, 10, promotion_probability=1.0, surrogate_options={"steps": 3})
    never = build_searcher("gp", space, 10, promotion_probability=0.0, surrogate_options={"steps": 3})
    for seed in range(3):
        assert always.select(context, candidates, seed).info.get("promotion") == 1.0
        assert "promotion" not in never.select(context, candidates, seed).info


@pytest.fixture
def tiny_space_and_trials():
    from lightning_fms.search.space import SearchSpace

    space = SearchSpace.from_dict({"lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True}})
    trials = {0: Trial(id=0, config={"lr": 0.01}), 1: Trial(id=1, config={"lr": 0.1})}
    trials[0].values = [0.3, 0.4]
    trials[1].values = [0.5]
    for trial in trials.values():
        trial.status = TrialStatus.PAUSED
    return space, trials
