"""Decisions that score with the current fit compute each candidate's posterior once per fitted surrogate."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fms import FreezeThawOptimizer, SearchSpace, build_searcher
from lightning_fms.search.posterior_cache import PosteriorCache, candidate_key
from lightning_fms.search.rows import Candidate

SPACE = SearchSpace.from_dict(
    {
        "model.lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
        "model.width": {"type": "int", "low": 1, "high": 8},
    }
)
FAST = {"full_fit_steps": 20, "refine_steps": 5, "full_fits": 1}


def test_the_cache_computes_only_what_it_has_not_seen_for_that_surrogate():
    cache = PosteriorCache()
    asked = []

    def compute(positions):
        asked.append(list(positions))
        return torch.tensor([float(p) for p in positions]), torch.ones(len(positions))

    a, b = Candidate(3, {"x": 1}, 2), Candidate(None, {"x": 2}, 1)
    first, second = object(), object()
    mean, _ = cache.posterior(first, [a, b], compute)
    assert mean.tolist() == [0.0, 1.0] and asked == [[0, 1]]
    mean, variance = cache.posterior(first, [b, Candidate(3, {"x": 1}, 3), a], compute)
    assert asked[-1] == [1] and mean.tolist() == [1.0, 1.0, 0.0] and variance.dtype == torch.float64
    cache.posterior(second, [a], compute)  # another fit: nothing kept
    assert asked[-1] == [0] and len(cache) == 1
    assert candidate_key(a) != candidate_key(Candidate(3, {"x": 1}, 2, fraction=0.5))


class Rows:
    """Counts the rows the surrogate scores."""

    def __init__(self, searcher) -> None:
        self.count = 0
        self.searcher = searcher
        self.wrap()

    def wrap(self) -> None:
        surrogate = self.searcher.surrogate
        posterior = surrogate.posterior

        def counted(rows):
            self.count += rows.x.shape[0]
            return posterior(rows)

        surrogate.posterior = counted


def value(config, epoch):
    return 1.0 - math.exp(-epoch * config["model.lr"]) - 0.01 * config["model.width"]


def test_decisions_with_the_current_fit_score_each_paused_trial_once_and_choose_as_without_the_cache():
    searcher = build_searcher("fms", SPACE, 4, surrogate_options=FAST, promotion_probability=0.0)
    optimizer = FreezeThawOptimizer(SPACE, searcher, budget=60, max_epochs_per_trial=4, seed=0, num_fresh_candidates=8)
    for _ in range(3):  # a few trials trained and paused, the surrogate fitted
        batch = [optimizer.claim({"w": i}) for i in range(4)]
        for s in batch:
            optimizer.complete(s.trial_id, s.epoch, value(s.config, s.epoch))
    rows = Rows(searcher)
    context = optimizer.selection_context()
    candidates = optimizer.candidates(100)
    paused = sum(c.trial_id is not None for c in candidates)
    assert paused >= 2
    first = searcher.select_with_current_fit(context, candidates, seed=1)
    assert rows.count == len(candidates)
    again = searcher.select_with_current_fit(context, candidates, seed=1)
    assert rows.count == len(candidates)  # nothing scored twice
    later = optimizer.candidates(101)  # new fresh configurations, the same paused trials
    searcher.select_with_current_fit(context, later, seed=2)
    assert rows.count == len(candidates) + (len(later) - paused)
    searcher._posteriors.clear()  # the same decision computed from scratch
    fresh = searcher.select_with_current_fit(context, candidates, seed=1)
    assert first.index == again.index == fresh.index
    for key in ("acquisition", "predicted_mean", "predicted_std"):
        assert first.info[key] == pytest.approx(fresh.info[key], rel=1e-9, abs=1e-12)


def test_a_new_fit_scores_everything_again():
    searcher = build_searcher("fms", SPACE, 4, surrogate_options=FAST, promotion_probability=0.0)
    optimizer = FreezeThawOptimizer(SPACE, searcher, budget=60, max_epochs_per_trial=4, seed=0, num_fresh_candidates=8)
    for _ in range(3):
        for s in [optimizer.claim({"w": i}) for i in range(3)]:
            optimizer.complete(s.trial_id, s.epoch, value(s.config, s.epoch))
    rows = Rows(searcher)
    context, candidates = optimizer.selection_context(), optimizer.candidates(100)
    searcher.select_with_current_fit(context, candidates, seed=1)
    searcher.select(context, candidates, seed=1)  # refits in place
    searcher.select_with_current_fit(context, candidates, seed=1)
    assert rows.count == 3 * len(candidates)
    searcher.adopt(searcher.surrogate)  # a background fit swapped in
    searcher.select_with_current_fit(context, candidates, seed=1)
    assert rows.count == 4 * len(candidates)
