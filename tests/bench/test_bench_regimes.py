"""The library-default method ``fms``, the hub regimes, the benchmark's default options and trials started."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lightning_fms.bench.methods import BASELINES, METHODS, QUICK_METHODS, RunOptions, run_method
from lightning_fms.bench.metrics import RegretBounds
from lightning_fms.bench.runner import result_rows, run_bench
from lightning_fms.options import StudyOptions, declared_default
from lightning_fms.search.optimizer import FreezeThawOptimizer
from lightning_fms.search.searcher import seeded_searcher


@pytest.fixture(scope="module")
def pool(synthetic_pool):
    return synthetic_pool(n=24, epochs=4)


def choices(run) -> list[tuple[int, int]]:
    return [(r["config"], r["epoch"]) for r in run.rows]


def set_default(monkeypatch, name: str, value: object) -> None:
    """Change a declared study default the way an edit of lightning_fms/options.py would."""
    declared = next(f for f in dataclasses.fields(StudyOptions) if f.name == name)
    monkeypatch.setattr(declared, "default", value)


def test_fms_is_the_declared_library_default_read_at_run_time(pool, monkeypatch, fast_options):
    resolved = METHODS["fms"].settings()
    assert resolved == {
        "searcher": declared_default("searcher"),
        "weights": declared_default("weights"),
        "curve": declared_default("curve"),
        "hide_hub": False,
    }
    assert "library default" in METHODS["fms"].describe()
    assert f"searcher {declared_default('searcher')}, weights {declared_default('weights')}" in (
        METHODS["fms"].describe()
    )

    set_default(monkeypatch, "searcher", "gp")
    set_default(monkeypatch, "weights", "none")
    assert METHODS["fms"].settings()["searcher"] == "gp"
    assert "searcher gp, weights none" in METHODS["fms"].describe()
    ours = run_method("fms", pool, 12, seed=3, kendall_at=(12,), options=fast_options)
    plain = run_method("gp", pool, 12, seed=3, kendall_at=(12,), options=fast_options)
    assert choices(ours) == choices(plain) and ours.kendall == plain.kendall  # the same method, same seed
    assert ours.settings["searcher"] == "gp" and ours.settings["hide_hub"] is False

    set_default(monkeypatch, "searcher", "random")
    assert choices(run_method("fms", pool, 12, seed=3, kendall_at=())) == choices(
        run_method("random", pool, 12, seed=3, kendall_at=())
    )


def test_a_changed_library_default_reruns_the_cached_fms_runs(pool, tmp_path, monkeypatch):
    set_default(monkeypatch, "searcher", "random")
    first = run_bench([pool], ["fms", "hyperband"], seeds=1, budget=8, out_dir=tmp_path, progress=None)
    assert first.ran == 2
    again = run_bench([pool], ["fms", "hyperband"], seeds=1, budget=8, out_dir=tmp_path, progress=None)
    assert again.ran == 0
    set_default(monkeypatch, "searcher", "gp")
    changed = run_bench([pool], ["fms", "hyperband"], seeds=1, budget=8, out_dir=tmp_path, progress=None)
    assert changed.ran == 1 and changed.runs[0].settings["searcher"] == "gp"  # hyperband's run is reused


def test_run_options_default_to_the_library_defaults(pool):
    options = RunOptions().to_dict()
    assert options["surrogate_options"] == options["gp_options"] == options["fms_options"] == {}
    assert options["featurizer_options"] == {}
    assert options["num_fresh_candidates"] == declared_default("num_fresh_candidates")
    assert options["num_startup_trials"] == declared_default("num_startup_trials")
    explicit = RunOptions(gp_options={"steps": 7}, fms_options={"a": 1}, surrogate_options={"full_fits": 1})
    assert explicit.options_for("gp") == {"steps": 7}
    assert explicit.options_for("fms") == {"a": 1}
    assert explicit.options_for("dyhpo") == {"full_fits": 1}
    assert explicit.options_for("random") == {}
    run = run_method("gp", pool, 4, seed=0, kendall_at=())
    assert run.settings["gp_options"] == {}


def test_hidden_regime_surrogates_cannot_tell_hub_entries_apart(pool):
    """With the hub hidden, two configurations that differ only in their hub entry get one forecast."""
    twin = dict(pool.configs[0])
    entries = pool.space[pool.space.hub_key].choices
    twin[pool.space.hub_key] = next(e for e in entries if e != twin[pool.space.hub_key])
    forecasts = {}
    for hidden in (False, True):
        search = seeded_searcher(
            "gp", pool.space, pool.epochs, seed=0, device="cpu", surrogate_options={"steps": 30}, hide_hub=hidden
        )
        opt = FreezeThawOptimizer(
            pool.space,
            search,
            budget=16,
            max_epochs_per_trial=pool.epochs,
            seed=0,
            num_fresh_candidates=8,
            configurations=list(pool.configs),
        )
        while (suggestion := opt.ask()) is not None:
            index = pool.index_of(suggestion.config)
            opt.tell(suggestion.trial_id, suggestion.epoch, float(pool.val[index, suggestion.epoch - 1]))
        mean, _ = opt.predict([pool.configs[0], twin])
        forecasts[hidden] = mean
    assert forecasts[True][0] == pytest.approx(forecasts[True][1], abs=1e-9)
    assert abs(forecasts[False][0] - forecasts[False][1]) > 1e-6


@pytest.mark.parametrize("name", ["gp-hidden", "dyhpo-hidden", "fms-hidden"])
def test_hidden_methods_spend_the_budget_and_record_their_regime(pool, name, fast_options):
    run = run_method(name, pool, 10, seed=1, kendall_at=(10,), options=fast_options)
    assert run.epochs_spent == 10 and run.settings["hide_hub"] is True
    assert np.isfinite(run.kendall[0]["kendall_tau"])
    assert "hidden" in METHODS[name].describe()


def test_peers_say_how_they_treat_the_hub():
    for name in ("random", "hyperband", "asha"):
        assert "same in both hub regimes" in METHODS[name].describe()
    assert "sees the hub entry" in METHODS["optuna"].describe()
    assert set(BASELINES) <= set(METHODS) and not any(b.startswith("fms") for b in BASELINES)
    assert "fms" in QUICK_METHODS and set(QUICK_METHODS) & set(BASELINES) and set(QUICK_METHODS) <= set(METHODS)


def test_trials_started_counts_distinct_configurations_begun(pool):
    # two start-up trials, then each trial to the cap of 4 epochs: A1 B1 B2 B3 B4 A2 A3 A4 C1 C2
    run = run_method("random", pool, 10, seed=0, kendall_at=())
    assert run.trials_started == 3
    rows = result_rows(run, RegretBounds.of(pool.val, pool.test, pool.mode), pool.mode)
    assert [r["trials_started"] for r in rows] == [1] + [2] * 7 + [3] * 2
    broad = run_method("hyperband", pool, 10, seed=0, kendall_at=())  # its first rung: one epoch each
    assert broad.trials_started == len({r["config"] for r in broad.rows}) > run.trials_started


def test_summary_reports_trials_started_per_100_epochs(pool, tmp_path):
    run_bench([pool], ["random"], seeds=2, budget=10, out_dir=tmp_path, progress=None)
    summary = (tmp_path / "summary.md").read_text()
    header = next(line for line in summary.splitlines() if line.startswith("| rank |"))
    row = next(line for line in summary.splitlines() if line.startswith("| 1 | random |"))
    column = [c.strip() for c in header.split("|")].index("trials /100 epochs")
    assert [c.strip() for c in row.split("|")][column] == "30.0 ± 0.0"  # 3 trials in 10 epochs, both seeds
    assert "| random | random search" in summary  # the methods table
