import math

import pytest
import torch

from lightning_fms import FMSError, FreezeThawOptimizer, RandomSearcher, SearchSpace, SuggestionKind, TrialStatus
from lightning_fms.search.searcher import Searcher, Selection, SurrogateSearcher
from lightning_fms.surrogate import DeepKernelSurrogate

SPACE = {
    "model.lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
    "model.width": {"type": "int", "low": 1, "high": 8},
}


class AlwaysResumeFirstPaused(Searcher):
    """Resume the oldest paused trial if any, else start the first fresh candidate."""

    def select(self, context, candidates, seed):
        paused = [i for i, c in enumerate(candidates) if c.trial_id is not None]
        return Selection(paused[0] if paused else 0)


def fake_value(config, epoch):
    return 1.0 - math.exp(-epoch * config["model.lr"]) - 0.01 * config["model.width"]


def run(opt, fail=None):
    while (s := opt.ask()) is not None:
        if fail is not None and fail(s):
            opt.tell_failure(s.trial_id, s.epoch, "RuntimeError: boom")
        else:
            opt.tell(s.trial_id, s.epoch, fake_value(s.config, s.epoch))
    return opt


def make(searcher=None, **kw):
    options = {"budget": 10, "max_epochs_per_trial": 3, "seed": 0, "num_startup_trials": 1}
    options.update(kw)
    return FreezeThawOptimizer(SearchSpace.from_dict(SPACE), searcher or AlwaysResumeFirstPaused(), **options)


def test_budget_is_spent_exactly_and_cap_respected():
    opt = run(make())
    assert opt.epochs_spent == 10
    assert sum(t.epochs for t in opt.trials.values()) == 10
    assert all(t.epochs <= 3 for t in opt.trials.values())
    # 10 epochs with cap 3, always resuming: trials of 3, 3, 3, 1
    assert [t.epochs for t in opt.trials.values()] == [3, 3, 3, 1]
    assert [t.status for t in opt.trials.values()] == [TrialStatus.FINISHED] * 3 + [TrialStatus.PAUSED]
    assert opt.ask() is None


def test_suggestions_start_then_resume_one_epoch_at_a_time():
    opt = make()
    s = opt.ask()
    assert s.kind == SuggestionKind.START and s.epoch == 1 and s.trial_id == 0
    opt.tell(0, 1, 0.5)
    s = opt.ask()
    assert s.kind == SuggestionKind.RESUME and s.trial_id == 0 and s.epoch == 2


def test_tell_must_match_ask():
    opt = make()
    s = opt.ask()
    with pytest.raises(RuntimeError, match="was asked"):
        opt.tell(s.trial_id, s.epoch + 1, 0.1)
    with pytest.raises(RuntimeError, match="not told"):
        opt.ask()


def test_failures_count_against_budget_and_are_never_resumed():
    opt = run(make(), fail=lambda s: s.trial_id == 0 and s.epoch == 2)
    assert opt.trials[0].status == TrialStatus.FAILED
    assert opt.trials[0].error == "RuntimeError: boom"
    assert opt.trials[0].epochs == 1
    assert opt.epochs_spent == 10
    assert all(d["trial"] != 0 for d in opt.decisions[2:])


def test_non_finite_value_marks_trial_failed():
    opt = make()
    s = opt.ask()
    opt.tell(s.trial_id, s.epoch, float("nan"))
    assert opt.trials[0].status == TrialStatus.FAILED
    assert opt.epochs_spent == 1


@pytest.mark.parametrize("budget", [0, -3, 2.5])
def test_bad_budget(budget):
    with pytest.raises(FMSError, match="budget must be an integer >= 1"):
        make(budget=budget)


def test_random_searcher_trains_each_config_to_the_cap():
    opt = run(make(RandomSearcher()))
    assert [t.epochs for t in opt.trials.values()] == [3, 3, 3, 1]


def test_fresh_candidates_are_seeded_by_decision():
    a, b = make(seed=3), make(seed=3)
    assert [c.config for c in a.candidates(5)] == [c.config for c in b.candidates(5)]
    assert [c.config for c in a.candidates(5)] != [c.config for c in a.candidates(6)]
    assert [c.config for c in a.candidates(5)] != [c.config for c in make(seed=4).candidates(5)]


def test_max_paused_trials_stops_the_worst():
    class AlwaysNew(Searcher):
        def select(self, context, candidates, seed):
            return Selection(next(i for i, c in enumerate(candidates) if c.trial_id is None))

    opt = make(AlwaysNew(), max_paused_trials=2, budget=5)
    stopped = []
    while (s := opt.ask()) is not None:
        stopped += opt.tell(s.trial_id, s.epoch, float(s.trial_id % 3))  # values 0, 1, 2, 0, 1
    statuses = {t.id: t.status for t in opt.trials.values()}
    assert sum(st == TrialStatus.PAUSED for st in statuses.values()) == 2
    # worst latest score goes first; on a tie the newer trial goes
    assert sorted(stopped) == [0, 3, 4]
    assert statuses[1] == TrialStatus.PAUSED and statuses[2] == TrialStatus.PAUSED


def test_state_round_trip_continues_identically():
    def searcher():
        return SurrogateSearcher(
            DeepKernelSurrogate(x_dim=2, curve_length=3, full_fit_steps=30, refine_steps=5, full_fits=2)
        )

    straight = run(make(searcher(), budget=8, num_startup_trials=2))
    partial = make(searcher(), budget=8, num_startup_trials=2)
    for _ in range(5):
        s = partial.ask()
        partial.tell(s.trial_id, s.epoch, fake_value(s.config, s.epoch))
    state = partial.state_dict()
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = make(searcher(), budget=8, num_startup_trials=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run(resumed)
    assert [(d["trial"], d["epoch"]) for d in resumed.decisions] == [
        (d["trial"], d["epoch"]) for d in straight.decisions
    ]


def test_state_from_other_settings_is_refused():
    opt = run(make(budget=2))
    other = make(seed=1)
    with pytest.raises(FMSError, match="another seed"):
        other.load_state_dict(opt.state_dict())


def test_configurations_restrict_fresh_candidates_to_the_pool():
    import numpy as np

    space = SearchSpace.from_dict(SPACE)
    rng = np.random.default_rng(1)
    pool = [space.sample(rng) for _ in range(7)]
    opt = make(RandomSearcher(), budget=21, configurations=pool, num_fresh_candidates=3)
    run(opt)
    started = [t.config for t in opt.trials.values()]
    assert all(c in pool for c in started)
    # 7 configurations x 3 epochs = 21: every configuration of the pool is used once, none twice.
    assert len(started) == 7 and len({tuple(sorted(c.items())) for c in started}) == 7
    assert opt.ask() is None


def test_configurations_are_validated_against_the_space():
    with pytest.raises(FMSError, match="configuration #1 does not fit the space"):
        make(configurations=[{"model.lr": 0.1, "model.width": 2}, {"model.lr": 5.0, "model.width": 2}])
    with pytest.raises(FMSError, match="at least one"):
        make(configurations=[])


def test_predict_forecasts_the_same_configurations_it_is_given():
    import numpy as np
    from scipy.stats import kendalltau

    space = SearchSpace.from_dict(SPACE)
    rng = np.random.default_rng(0)
    pool = [space.sample(rng) for _ in range(24)]
    # two fits from scratch, warm starts after: Kendall's tau 0.75 (0.82 with ten fits from scratch, at 3x the time)
    surrogate = DeepKernelSurrogate(x_dim=space.dim, curve_length=3, full_fit_steps=300, refine_steps=20, full_fits=2)
    opt = make(SurrogateSearcher(surrogate), budget=24, configurations=pool, num_fresh_candidates=24)
    with pytest.raises(FMSError, match="makes no forecasts"):
        make(RandomSearcher()).predict(pool)
    run(opt)
    mean, variance = opt.predict(pool)
    assert mean.shape == variance.shape == (24,) and np.all(variance > 0)
    truth = [fake_value(c, 3) for c in pool]
    assert kendalltau(mean, truth).statistic > 0.3
    # A trained configuration is forecast from its curve: reversing the pool reverses the forecasts.
    reversed_mean, _ = opt.predict(pool[::-1])
    np.testing.assert_allclose(reversed_mean, mean[::-1], rtol=1e-5, atol=1e-6)
    with pytest.raises(FMSError, match="epoch must be in"):
        opt.predict(pool, epoch=4)
