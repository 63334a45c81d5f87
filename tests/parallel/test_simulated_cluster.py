"""The real tuner and driver on a simulated cluster: budget exact, no epoch twice, utilisation as defined."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from lightning_fms import FMSTuner, SearchSpace
from lightning_fms.parallel.simulation import EpochTimes, SimulatedExecutor
from lightning_fms.parallel.synthetic import SyntheticCurves, TabulatedCurves
from lightning_fms.search.trial import config_key

ROOT = Path(__file__).resolve().parents[2]
SPACE = {
    "hub": {"type": "hub"},
    "model.lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
    "model.momentum": {"type": "float", "low": 0.0, "high": 0.95},
    "data.batch_size": {"type": "categorical", "choices": [16, 32, 64, 128]},
}


#: Fits of a few steps: the test is about the driver and the simulated cluster, not the surrogate.
FITS = {"full_fit_steps": 20, "refine_steps": 5, "full_fits": 1}


def simulate(hub, study_dir, workers=8, budget=60, weights="auto", **executor_options):
    space = SearchSpace.from_dict(SPACE, hub_entries=hub.names)
    executor = SimulatedExecutor(
        workers,
        SyntheticCurves(space, seed=0),
        epoch_times=EpochTimes(60.0, 0.3),
        seed=0,
        monitor="val_acc",
        cap=6,
        modules=hub.build,
        hub_key="hub",
        **executor_options,
    )
    tuner = FMSTuner(
        executor=executor,
        space=space,
        hub=hub,
        study_dir=study_dir,
        budget=budget,
        monitor="val_acc",
        max_epochs_per_trial=6,
        num_fresh_candidates=16,
        surrogate_options=FITS,
        weights=weights,
        progress=False,
    )
    tuner.run()
    executor.close()
    return tuner, executor


def test_eight_simulated_workers_spend_the_budget_exactly_with_no_epoch_twice(hub, tmp_path):
    tuner, executor = simulate(hub, tmp_path / "s")
    trained = [(d["trial"], d["epoch"]) for d in tuner.optimizer.decisions]
    assert tuner.optimizer.epochs_spent == 60 == len(trained) == len(set(trained))
    assert executor.duplicates == [] and sum(executor.trained.values()) == 60
    assert not tuner.optimizer.running
    for trial in tuner.optimizer.trials.values():  # each trial's epochs were committed 1, 2, ... in order
        assert [e for t, e in trained if t == trial.id] == list(range(1, trial.epochs + 1))
    rows = list(csv.DictReader((tmp_path / "s" / "trajectory.csv").open()))
    assert len(rows) == 60 and {r["worker"] for r in rows} <= {f"sim-w{i}" for i in range(8)}
    assert "weights" in {p.name for p in (tmp_path / "s").iterdir()}  # fms on a hub read the weights

    stats = executor.stats()
    busy = sum(end - start for spans in executor.intervals.values() for start, end in spans)
    assert stats.busy_s == pytest.approx(busy)
    assert stats.utilisation == pytest.approx(busy / (8 * stats.makespan_s))
    last_end = max(end for spans in executor.intervals.values() for _, end in spans)
    assert last_end <= stats.makespan_s < last_end + 30.0  # the makespan ends with the driver's last commit
    assert stats.makespan_s >= 60 * 30.0 / 8  # 60 epochs of about a minute on 8 workers
    assert 0.8 * executor.ceiling() < stats.utilisation <= executor.ceiling() + 1e-9
    assert stats.submitted == 60 and stats.decisions_per_s == pytest.approx(60 / stats.makespan_s)


def test_lost_workers_are_given_back_and_the_budget_stays_exact(hub, tmp_path):
    tuner, executor = simulate(hub, tmp_path / "s", workers=4, budget=24, weights="none", loss_probability=0.2)
    trained = [(d["trial"], d["epoch"]) for d in tuner.optimizer.decisions]
    assert executor.stats().lost > 0
    assert tuner.optimizer.epochs_spent == 24 == len(set(trained))
    assert executor.duplicates == []


def _recipe(monkeypatch):
    spec = importlib.util.spec_from_file_location("simulate_cluster", ROOT / "recipes" / "simulate_cluster.py")
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, recipe)
    spec.loader.exec_module(recipe)
    return recipe


def test_the_recipe_times_what_it_names_and_prints_its_table(monkeypatch, tmp_path, capsys):
    """recipes/simulate_cluster.py: every timed method exists (a renamed one would drop out of the split)."""
    recipe = _recipe(monkeypatch)
    argv = ["--workers", "4", "--epochs", "12", "--cap", "3", "--searchers", "fms", "--hub", "none"]
    argv += ["--scratch", str(tmp_path)]
    tuner, _ = recipe.build_tuner(recipe.make_parser().parse_args(argv), "fms", 4, tmp_path / "s")
    timed = [(path, getattr(recipe._attribute(tuner, path), method, None)) for _, path, method, _ in recipe.TIMED]
    assert [path for path, method in timed if not callable(method)] == ["snapshots"]  # no weights without a hub
    assert recipe.main([*argv, "--json", str(tmp_path / "t.jsonl")]) == 0
    out = capsys.readouterr().out
    row = json.loads((tmp_path / "t.jsonl").read_text())
    assert row["epochs"] == 12 and 0 < row["utilisation"] <= row["ceiling"] + 1e-9
    assert "| fms | refit auto, reports driver | 4 | 12 |" in out


def test_a_benchmark_pools_tabulated_curves_and_weights_drive_the_simulation(make_recipe, hub, tmp_path):
    """TabulatedCurves over a real tiny pool: values and weights are the ones its real training left."""
    from lightning_fms.bench.pool import load_pool
    from lightning_fms.bench.task import BenchTask
    from lightning_fms.testing.pools import build_tiny_pools

    data = make_recipe(max_epochs_per_trial=3)
    data["data"]["init_args"]["test_fraction"] = 0.25
    paths = build_tiny_pools({"tiny": {**data, "pool": {"size": 4, "epochs": 3, "seed": 0}}}, tmp_path, tmp_path)
    pool = load_pool(BenchTask.from_file(paths["tiny"]), cache_dir=tmp_path, build=False)
    curves = TabulatedCurves.from_pool(pool)
    executor = SimulatedExecutor(
        2, curves, seed=0, monitor="val_acc", cap=3, modules=pool.load_hub_module, hub_key=pool.space.hub_key
    )
    tuner = FMSTuner(
        executor=executor,
        space=pool.space,
        hub=hub,
        study_dir=tmp_path / "s",
        budget=8,
        monitor="val_acc",
        max_epochs_per_trial=3,
        num_startup_trials=2,
        surrogate_options=FITS,
        progress=False,
    )
    tuner.optimizer.configurations = pool.configs  # the study chooses among the table's configurations
    tuner.run()
    executor.close()
    assert tuner.optimizer.epochs_spent == 8 and executor.duplicates == []
    index = {config_key(c): i for i, c in enumerate(pool.configs)}
    for trial in tuner.optimizer.trials.values():
        row = index[config_key(trial.config)]
        assert trial.values == [float(pool.val[row, k]) for k in range(trial.epochs)]
    trial = next(t for t in tuner.optimizer.trials.values() if t.epochs)
    snapshot = tuner.snapshots.get(("trial", trial.id, trial.epochs))
    real = pool.load_module(index[config_key(trial.config)], trial.epochs).state_dict()
    assert snapshot.keys() == real.keys() and all(torch.equal(snapshot[k], real[k]) for k in real)
