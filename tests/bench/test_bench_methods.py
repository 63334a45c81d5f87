"""Benchmark methods on in-memory pools: budgets, determinism, incumbents, forecasts, Hyperband and Optuna."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from scipy import stats

from lightning_fms.bench.ledger import Ledger
from lightning_fms.bench.methods import METHODS, check_methods, run_method
from lightning_fms.bench.metrics import RegretBounds, normalised_regret, rank_correlation, to_scores
from lightning_fms.bench.peers import hyperband_brackets, nearest, rung_epochs
from lightning_fms.bench.pool import Pool
from lightning_fms.errors import FMSError


@pytest.fixture(scope="module")
def pool(synthetic_pool) -> Pool:
    return synthetic_pool()


def choices(run) -> list[tuple[int, int, float]]:
    return [(r["config"], r["epoch"], r["val"]) for r in run.rows]


CHEAP = ["dyhpo", "gp", "random", "hyperband", "asha", "optuna", "fms-stats", "fms-flat-nocnn"]


@pytest.mark.parametrize("name", CHEAP)
def test_every_method_spends_exactly_the_budget_and_reruns_identically(pool, name, fast_options):
    first = run_method(name, pool, 15, seed=1, kendall_at=(10,), options=fast_options)
    again = run_method(name, pool, 15, seed=1, kendall_at=(10,), options=fast_options)
    other = run_method(name, pool, 15, seed=2, kendall_at=(10,), options=fast_options)
    assert first.epochs_spent == 15 and not first.exhausted
    assert [r["epochs_spent"] for r in first.rows] == list(range(1, 16))
    assert choices(first) == choices(again)
    assert choices(first) != choices(other)
    # the books: each config's epochs come in order 1, 2, ... (continuation), seconds are tabulated + measured
    trained: dict[int, int] = {}
    for r in first.rows:
        expected = trained.get(r["config"], 0) + 1
        assert r["epoch"] == expected or (name == "optuna" and r["epoch"] == 1)
        trained[r["config"]] = r["epoch"]
    tabulated = sum(pool.train_seconds[r["config"], r["epoch"] - 1] for r in first.rows)
    assert first.rows[-1]["train_s"] == pytest.approx(tabulated)
    assert first.rows[-1]["wall_s"] == pytest.approx(tabulated + first.rows[-1]["decision_s"])
    assert first.rows[-1]["decision_s"] >= 0
    if METHODS[name].forecasts:
        assert [k["epochs_spent"] for k in first.kendall] == [10]
        assert first.kendall == again.kendall
    else:
        assert first.kendall == []


@pytest.mark.parametrize("name", ["fms-gmn", "fms-nfn"])
def test_the_weight_featurizers_run_on_the_pool_reproducibly(pool, name, fast_options):
    run = run_method(name, pool, 8, seed=0, kendall_at=(8,), options=fast_options)
    again = run_method(name, pool, 8, seed=0, kendall_at=(8,), options=fast_options)
    assert run.epochs_spent == 8
    assert math.isfinite(run.kendall[0]["kendall_tau"])
    assert choices(run) == choices(again) and run.kendall == again.kendall


@pytest.mark.parametrize("name", ["fms-stats", "gp", "random", "hyperband", "asha", "optuna"])
def test_failed_curves_are_never_incumbents_and_the_budget_is_still_spent(synthetic_pool, name, fast_options):
    pool = synthetic_pool(n=16, epochs=4)
    pool.val[:5, 1:] = np.nan  # five configurations diverge after their first epoch
    pool.val[5, :] = np.nan  # one fails at once
    run = run_method(name, pool, 30, seed=0, kendall_at=(30,), options=fast_options)
    assert run.epochs_spent == 30 and not run.exhausted
    best = run.column("best_val")
    assert np.isfinite(best[np.isfinite(best)]).all()
    assert np.nanmax(run.column("val")) == best[-1]


def test_regret_is_monotone_in_unit_range_and_zero_iff_the_best_was_seen(pool):
    bounds = RegretBounds.of(pool.val, pool.test, pool.mode)
    best_cells = set(zip(*np.nonzero(to_scores(pool.val, pool.mode) == bounds.best_val), strict=True))
    for name in ("random", "hyperband", "optuna"):
        run = run_method(name, pool, 60, seed=0, kendall_at=())
        regret = normalised_regret(to_scores(run.column("best_val"), pool.mode), bounds.best_val, bounds.worst_val)
        assert np.all(np.diff(regret) <= 0)
        assert np.all((regret >= 0) & (regret <= 1))
        seen = set()
        for r, g in zip(run.rows, regret, strict=True):
            seen.add((r["config"], r["epoch"] - 1))
            assert (g == 0) == bool(seen & best_cells)


def test_min_mode_regret_uses_negated_scores(synthetic_pool):
    pool = synthetic_pool(n=12, epochs=3, mode="min")
    bounds = RegretBounds.of(pool.val, pool.test, "min")
    assert bounds.best_val == pytest.approx(-np.nanmin(pool.val))
    run = run_method("random", pool, 36, seed=0, kendall_at=())
    assert run.rows[-1]["best_val"] == pytest.approx(np.nanmin(pool.val))


def test_test_regret_follows_the_validation_selected_incumbent(synthetic_pool):
    pool = synthetic_pool(n=3, epochs=2)
    pool.val[:] = [[0.1, 0.2], [0.3, 0.9], [0.2, 0.4]]
    pool.test[:] = [[0.1, 0.95], [0.3, 0.5], [0.2, 0.4]]
    run = run_method("random", pool, 6, seed=0, kendall_at=())
    last = run.rows[-1]
    assert last["best_val"] == 0.9 and last["incumbent_test"] == 0.5  # not 0.95, the best test value seen
    bounds = RegretBounds.of(pool.val, pool.test, "max")
    test_regret = normalised_regret(last["incumbent_test"], bounds.best_test, bounds.worst_test)
    assert float(test_regret) == pytest.approx((0.95 - 0.5) / (0.95 - 0.1))


def test_rank_correlation_pairs_the_same_configurations():
    predicted = np.array([0.9, 0.1, 0.5, 0.3, 0.7])
    true = np.array([0.8, 0.2, 0.4, 0.3, 0.9])
    ours = rank_correlation(predicted, true)
    assert ours["kendall_tau"] == pytest.approx(stats.kendalltau(predicted, true).statistic)
    assert ours["kendall_tau"] == pytest.approx(0.8)
    upstream = stats.kendalltau(np.argsort(-predicted), np.argsort(-true)).statistic  # sequences of ids
    assert upstream == pytest.approx(-0.4)  # a good forecast would look anti-correlated
    assert ours["n_configs"] == 5
    assert math.isnan(rank_correlation(np.ones(5), true)["kendall_tau"])
    assert rank_correlation(np.array([1.0, np.nan, 0.0]), np.array([1.0, 0.0, 0.0]))["n_configs"] == 2


def test_recorded_kendall_is_over_all_pool_configurations_against_true_final_scores(pool, fast_options):
    run = run_method("dyhpo", pool, 12, seed=0, kendall_at=(6, 12, 99), options=fast_options)
    assert [k["epochs_spent"] for k in run.kendall] == [6, 12]
    true_final = to_scores(pool.val[:, -1], pool.mode)
    for record in run.kendall:
        predicted = np.array(record["predicted"])
        assert predicted.shape == (pool.size,) and record["n_configs"] == pool.size
        assert record["kendall_tau"] == pytest.approx(stats.kendalltau(predicted, true_final).statistic)
        assert record["spearman"] == pytest.approx(stats.spearmanr(predicted, true_final).statistic)
    # forecasting is read-only: the same run without checks makes the same choices
    for name in ("dyhpo", "fms-stats"):
        checked = run if name == "dyhpo" else run_method(name, pool, 12, seed=0, kendall_at=(6,), options=fast_options)
        assert choices(run_method(name, pool, 12, seed=0, kendall_at=(), options=fast_options)) == choices(checked)


def test_hyperband_brackets_follow_the_eta_rule():
    assert rung_epochs(20) == [1, 3, 9, 20]
    assert rung_epochs(27) == [1, 3, 9, 27]
    assert hyperband_brackets(20) == [
        [(27, 1), (9, 3), (3, 9), (1, 20)],
        [(12, 3), (4, 9), (1, 20)],
        [(6, 9), (2, 20)],
        [(4, 20)],
    ]


def test_hyperband_promotes_the_best_third_and_continues_them(synthetic_pool):
    pool = synthetic_pool(n=60, epochs=9)  # rungs 1, 3, 9: first bracket 9 -> 3 -> 1
    assert hyperband_brackets(9)[0] == [(9, 1), (3, 3), (1, 9)]
    run = run_method("hyperband", pool, 9 + 3 * 2 + 6, seed=4, kendall_at=())
    rows = run.rows
    first = [r["config"] for r in rows[:9]]
    assert len(set(first)) == 9 and all(r["epoch"] == 1 for r in rows[:9])
    at1 = {i: pool.val[i, 0] for i in first}
    top3 = sorted(first, key=lambda i: -at1[i])[:3]
    promoted = rows[9:15]
    assert [r["config"] for r in promoted] == [top3[0], top3[0], top3[1], top3[1], top3[2], top3[2]]
    assert [r["epoch"] for r in promoted] == [2, 3, 2, 3, 2, 3]  # continued, not restarted
    best = max(top3, key=lambda i: pool.val[i, 2])
    assert [(r["config"], r["epoch"]) for r in rows[15:]] == [(best, e) for e in range(4, 10)]


def test_asha_promotes_only_from_the_top_third(pool):
    run = run_method("asha", pool, 60, seed=0, kendall_at=())
    levels = rung_epochs(pool.epochs)  # [1, 3, 6]
    scores = to_scores(pool.val, pool.mode)
    reached: dict[int, int] = {}
    promotions = 0
    for r in run.rows:
        i, epoch = r["config"], r["epoch"]
        for level in levels[:-1]:
            if epoch == level + 1:  # i leaves the rung: it must be in its's top third right now
                members = [j for j, e in reached.items() if e >= level]
                top = sorted(members, key=lambda j, e=level: -scores[j, e - 1])[: len(members) // 3]
                assert i in top
                promotions += 1
        reached[i] = epoch
    assert promotions >= 3


def test_optuna_prunes_clearly_bad_curves(synthetic_pool):
    pool = synthetic_pool(n=80, epochs=9)
    bad = pool.val[:, -1] < np.quantile(pool.val[:, -1], 0.5)
    pool.val[bad] = 0.01  # half of the pool is flat at the bottom from epoch 1
    run = run_method("optuna", pool, 120, seed=0, kendall_at=())
    lengths: dict[int, int] = {}
    for r in run.rows:
        lengths[r["config"]] = max(lengths.get(r["config"], 0), r["epoch"])
    last = run.rows[-1]["config"]
    stopped = {i: n for i, n in lengths.items() if n < pool.epochs and i != last}
    assert any(bad[i] for i in stopped), lengths  # a flat-at-the-bottom curve was pruned
    assert set(stopped.values()) <= {1, 3}, stopped  # only at the Hyperband rungs 1, 3 (eta 3)
    assert len(lengths) > 120 // pool.epochs  # pruning left room for more trials than full training would


def test_nearest_prefers_unused_configurations():
    encoded = np.array([[0.0, 0.0], [0.1, 0.0], [1.0, 1.0]])
    used = np.array([True, False, False])
    assert nearest(encoded, np.array([0.0, 0.0]), used) == 1
    assert nearest(encoded, np.array([0.0, 0.0]), np.ones(3, dtype=bool)) == 0


def test_ledger_refuses_epochs_beyond_the_budget(pool):
    ledger = Ledger(pool, 1)
    ledger.train(0, 1)
    assert ledger.done
    with pytest.raises(Exception):  # noqa: B017
        ledger.train(0, 2)


def test_bad_method_and_budget_are_one_line_errors(pool):
    with pytest.raises(FMSError, match="unknown method.*known: fms, fms-hidden, fms-noweights"):
        check_methods(["random", "bogus"])
    with pytest.raises(FMSError, match="budget must be an integer in"):
        run_method("random", pool, pool.size * pool.epochs + 1, seed=0)


def test_missing_optuna_is_a_one_line_install_hint(pool, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    with pytest.raises(FMSError, match=r"pip install 'lightning_fms\[bench\]'"):
        run_method("optuna", pool, 5, seed=0)
