"""The benchmark runner, tables, report and ``lightning-fms bench`` on in-memory pools."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_fms.bench.methods import METHODS
from lightning_fms.bench.metrics import mean_ci, step_resample, wall_grid
from lightning_fms.bench.runner import KENDALL_COLUMNS, RESULT_COLUMNS, PoolSource, run_bench, run_path
from lightning_fms.errors import FMSError

METHODS_USED = ["dyhpo", "random", "hyperband", "optuna"]


@pytest.fixture(scope="module")
def pools(synthetic_pool):
    return [
        synthetic_pool(n=30, epochs=5, name="task-a"),
        synthetic_pool(n=30, epochs=5, seed=1, name="task-b"),
    ]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_run_bench_writes_tables_report_and_resumes(pools, tmp_path, fast_options):
    lines: list[str] = []
    result = run_bench(
        pools,
        METHODS_USED,
        seeds=2,
        budget=12,
        out_dir=tmp_path,
        kendall_at=(6, 12),
        progress=lines.append,
        options=fast_options,
    )
    assert result.ran == 2 * 4 * 2 and result.cached == 0
    assert sum(" seed " in line for line in lines) == 16

    results = read_csv(tmp_path / "results.csv")
    assert list(results[0]) == list(RESULT_COLUMNS)
    assert len(results) == 2 * 4 * 2 * 12
    for row in results:
        assert 0.0 <= float(row["regret"]) <= 1.0 and 0.0 <= float(row["test_regret"]) <= 1.0
        assert float(row["wall_s"]) == pytest.approx(float(row["train_s"]) + float(row["decision_s"]))
    kendall = read_csv(tmp_path / "kendall.csv")
    assert list(kendall[0]) == list(KENDALL_COLUMNS)
    assert {r["method"] for r in kendall} == {"dyhpo"}  # only surrogate methods forecast
    assert sorted({int(r["epochs_spent"]) for r in kendall}) == [6, 12]
    assert all(int(r["n_configs"]) == 30 for r in kendall)

    for task in ("task-a", "task-b"):
        assert (tmp_path / f"regret_epochs_{task}.png").stat().st_size > 1000
        assert (tmp_path / f"regret_wall_{task}.png").stat().st_size > 1000
    assert (tmp_path / "kendall.png").stat().st_size > 1000
    summary = (tmp_path / "summary.md").read_text()
    for fragment in ("## task-a", "## task-b", "| rank | method |", "regret @12", "Kendall tau @6", "machine:", "UTC"):
        assert fragment in summary
    for method in METHODS_USED:
        assert f"| {method} |" in summary

    run_file = run_path(tmp_path, "task-a", "optuna", 1)
    mtime = run_file.stat().st_mtime_ns
    again = run_bench(
        pools,
        METHODS_USED,
        seeds=2,
        budget=12,
        out_dir=tmp_path,
        kendall_at=(6, 12),
        progress=None,
        options=fast_options,
    )
    assert again.ran == 0 and again.cached == 16
    assert run_file.stat().st_mtime_ns == mtime
    assert read_csv(tmp_path / "results.csv") == results

    # other settings: the affected runs are run again, the others reused
    third = run_bench(
        pools[:1],
        ["dyhpo", "random"],
        seeds=[1],
        budget=12,
        out_dir=tmp_path,
        kendall_at=(6,),
        progress=None,
        options=fast_options,
    )
    assert third.ran == 1 and third.cached == 1  # dyhpo's forecast checks changed; random has none
    assert json.loads(run_path(tmp_path, "task-a", "dyhpo", 1).read_text())["bench_settings"]["kendall_at"] == [6]


def test_a_changed_pool_or_budget_invalidates_cached_runs(pools, tmp_path, synthetic_pool):
    run_bench(pools[:1], ["random"], seeds=1, budget=10, out_dir=tmp_path, progress=None)
    assert run_bench(pools[:1], ["random"], seeds=1, budget=11, out_dir=tmp_path, progress=None).ran == 1
    changed = synthetic_pool(n=30, epochs=5, seed=7, name="task-a")
    assert run_bench([changed], ["random"], seeds=1, budget=11, out_dir=tmp_path, progress=None).ran == 1


def test_parallel_jobs_match_the_sequential_run(pools, tmp_path):
    sequential = run_bench(
        pools[:1], ["random", "hyperband"], seeds=2, budget=10, out_dir=tmp_path / "a", progress=None
    )
    parallel = run_bench(
        pools[:1], ["random", "hyperband"], seeds=2, budget=10, out_dir=tmp_path / "b", jobs=2, progress=None
    )
    assert parallel.ran == 4
    for x, y in zip(sequential.runs, parallel.runs, strict=True):
        assert [(r["config"], r["epoch"]) for r in x.rows] == [(r["config"], r["epoch"]) for r in y.rows]


def test_unpicklable_pools_need_one_job(pools, tmp_path, synthetic_pool):
    pool = synthetic_pool(n=10, epochs=3, name="closure")
    pool.load_hub_module = lambda name: None  # a closure does not pickle
    with pytest.raises(FMSError, match="use jobs=1 or give it as a PoolSource"):
        run_bench([pool], ["random"], seeds=2, budget=5, out_dir=tmp_path, jobs=2, progress=None)


def test_bad_arguments_are_one_line_errors(pools, tmp_path):
    with pytest.raises(FMSError, match="unknown method.*known: "):
        run_bench(pools, ["nope"], seeds=1, budget=5, out_dir=tmp_path, progress=None)
    with pytest.raises(FMSError, match="budget must be an integer"):
        run_bench(pools, ["random"], seeds=1, budget=0, out_dir=tmp_path, progress=None)
    with pytest.raises(FMSError, match="task names must be distinct"):
        run_bench([pools[0], pools[0]], ["random"], seeds=1, budget=5, out_dir=tmp_path, progress=None)
    with pytest.raises(FMSError, match="seeds"):
        run_bench(pools, ["random"], seeds=0, budget=5, out_dir=tmp_path, progress=None)


def test_seed_statistics_and_grids():
    mean, low, high = mean_ci(np.array([[1.0, 2.0], [3.0, 2.0]]))
    assert mean.tolist() == [2.0, 2.0]
    assert high[0] - mean[0] == pytest.approx(12.7062047 * 1.0)  # t(0.975, 1) * sd / sqrt(2), sd = sqrt(2)
    assert low[1] == high[1] == 2.0
    mean, low, high = mean_ci(np.array([[0.5, 0.25]]))
    assert mean.tolist() == [0.5, 0.25] and np.isnan(low).all() and np.isnan(high).all()
    values = step_resample(np.array([2.0, 5.0]), np.array([0.5, 0.1]), np.array([1.0, 2.0, 4.9, 5.0, 9.0]))
    assert values.tolist() == [1.0, 0.5, 0.5, 0.1, 0.1]
    grid = wall_grid([2.0, 3.0], [50.0, 80.0], points=5)
    assert grid[0] == pytest.approx(2.0) and grid[-1] == pytest.approx(80.0)


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "lightning_fms.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("lightning-fms: error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_bench_refuses_unknown_methods_with_one_line(tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text("name: t\n")
    proc = cli("bench", "--out", str(tmp_path / "out"), "--tasks", str(task), "--methods", "random", "bogus")
    assert_one_line_error(proc, "unknown method(s) bogus", "known: " + ", ".join(METHODS))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "use --tasks"),
        (["--tasks", "missing.yaml"], "missing.yaml does not exist"),
        (["--tasks", "task.yaml", "--seeds", "0"], "--seeds must be >= 1"),
        (["--tasks", "task.yaml", "--jobs", "0"], "--jobs must be >= 1"),
    ],
)
def test_cli_bench_bad_input_exits_2(tmp_path, monkeypatch, capsys, args, fragment):
    from lightning_fms.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "task.yaml").write_text("name: t\n")
    assert main(["bench", "--out", "out", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightning-fms: error:") and fragment in err[0], err
    assert not (tmp_path / "out").exists()


def test_pool_source_is_a_picklable_task_reference(tmp_path):
    import pickle

    source = PoolSource(str(tmp_path / "t.yaml"), cache_dir=str(tmp_path))
    assert pickle.loads(pickle.dumps(source)) == source
