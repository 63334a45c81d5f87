"""The benchmark's leave-one-task-out protocol: a held-out task's pool is never read to pretrain its prior."""

from __future__ import annotations

import shutil

import pytest

from lightning_fms.bench.methods import RunOptions
from lightning_fms.bench.pool import pool_dir
from lightning_fms.bench.runner import PoolSource, pool_fingerprint, run_bench
from lightning_fms.bench.task import BenchTask
from lightning_fms.bench.transfer import leave_one_out_prior
from lightning_fms.errors import FMSError
from lightning_fms.testing.pools import build_tiny_pools
from lightning_fms.transfer.prior import load_prior
from lightning_fms.transfer.sources import read_source

FAST = {"steps": 20, "batch_rows": 16, "trunk_steps": 20}
FAST_FMS = RunOptions(fms_options={"full_fit_steps": 20, "refine_steps": 5, "full_fits": 1})
"""Short surrogate fits for the benchmark's fms and fms-prior runs: the protocol is under test, not fit quality."""


@pytest.fixture(scope="module")
def three_tasks(make_recipe, tmp_path_factory):
    """Three real tiny pools (4 configurations x 3 epochs) of the tiny hub, told apart by their pool seed."""
    root = tmp_path_factory.mktemp("loo")
    cache = root / "cache"
    recipes = {}
    for seed, name in enumerate(("alpha", "beta", "gamma")):
        data = make_recipe(max_epochs_per_trial=3)
        data["data"]["init_args"]["test_fraction"] = 0.25
        recipes[name] = {**data, "pool": {"size": 4, "epochs": 3, "seed": seed}}
    paths = build_tiny_pools(recipes, root, cache)
    return {name: (BenchTask.from_file(path), path) for name, path in paths.items()}, cache


def _sources(tasks):
    return {name: str(path) for name, (_, path) in tasks.items()}


def _fingerprints(tasks, cache):
    return {name: read_source(path, cache_dir=cache, weights=False).fingerprint for name, (_, path) in tasks.items()}


def test_pretraining_for_a_held_out_task_never_reads_its_pool(three_tasks, tmp_path):
    tasks, cache = three_tasks
    fingerprints = _fingerprints(tasks, cache)
    # remove the held-out task's pool altogether: pretraining without it must still work
    private = tmp_path / "cache"
    shutil.copytree(cache, private)
    shutil.rmtree(pool_dir(tasks["gamma"][0], private))
    path = leave_one_out_prior(
        "fms", "gamma", _sources(tasks), fingerprints, tmp_path / "out", cache_dir=str(private), overrides=FAST
    )
    prior = load_prior(path)
    read = {s["fingerprint"] for s in prior.metadata["sources"]}
    assert read == {fingerprints["alpha"], fingerprints["beta"]}
    assert fingerprints["gamma"] not in read
    # the control: holding out another task needs the removed pool, and says so
    with pytest.raises(FMSError, match="gamma"):
        leave_one_out_prior(
            "fms", "alpha", _sources(tasks), fingerprints, tmp_path / "out", cache_dir=str(private), overrides=FAST
        )


def test_priors_are_cached_per_held_out_task_and_kind(three_tasks, tmp_path):
    tasks, cache = three_tasks
    fingerprints = _fingerprints(tasks, cache)
    args = (_sources(tasks), fingerprints, tmp_path / "out")
    first = leave_one_out_prior("dyhpo", "alpha", *args, cache_dir=str(cache), overrides=FAST)
    again = leave_one_out_prior("dyhpo", "alpha", *args, cache_dir=str(cache), overrides=FAST)
    other = leave_one_out_prior("dyhpo", "beta", *args, cache_dir=str(cache), overrides=FAST)
    assert first == again and first.stat().st_mtime_ns == again.stat().st_mtime_ns
    assert other != first
    assert load_prior(first).metadata["searcher"] == "dyhpo" and load_prior(first).metadata["weights"] == "none"
    with pytest.raises(FMSError, match="no task to pretrain on"):
        leave_one_out_prior("fms", "alpha", {"alpha": args[0]["alpha"]}, fingerprints, tmp_path, overrides=FAST)


def test_the_prior_methods_run_in_the_benchmark_and_report_against_their_counterparts(three_tasks, tmp_path):
    tasks, cache = three_tasks
    pools = [PoolSource(str(path), cache_dir=str(cache), build=False) for _, path in tasks.values()]
    result = run_bench(
        pools,
        ["fms", "fms-prior"],
        seeds=2,
        budget=6,
        out_dir=tmp_path / "bench",
        kendall_at=(6,),
        progress=None,
        options=FAST_FMS,
        prior_options=FAST,
    )
    assert len(result.runs) == 12
    by_method = {r.method: r for r in result.runs if r.task == "beta"}
    prior_setting = by_method["fms-prior"].settings["prior"]
    assert prior_setting is not None and "prior" not in by_method["fms"].settings
    summary = result.summary.read_text()
    assert "## Transfer: leave one task out" in summary and "fms-prior vs fms" in summary
    assert len(list((tmp_path / "bench" / "priors").glob("fms-without-*.safetensors"))) == 3
    assert {pool_fingerprint(p.load()) for p in pools}  # every pool still loads: nothing was modified
