"""Studies on the session's loopback Ray cluster: budget exact, no epoch twice, sync reruns, Ray equals in-process."""

from __future__ import annotations

import pytest
import torch

from lightning_fms.parallel.ray_executor import RayExecutor
from lightning_fms.search.trial import TrialStatus
from lightning_fms.study.directory import StudyDirectory
from lightning_fms.testing.ray_trials import epoch_executor
from lightning_fms.testing.small_study import decisions, tuner_for


@pytest.fixture
def sync(ray_executor):
    """The session's executor in sync mode for one test."""
    ray_executor.mode = "sync"
    yield ray_executor
    ray_executor.mode = "async"


def test_a_two_worker_study_spends_the_budget_exactly_and_never_trains_an_epoch_twice(
    ray_executor, hub, tmp_path, fast_surrogate
):
    tuner = tuner_for(hub, tmp_path / "s", ray_executor, fast_surrogate)
    result = tuner.run()
    trained = [(d["trial"], d["epoch"]) for d in tuner.optimizer.decisions]
    assert result.epochs_spent == 8 and tuner.optimizer.budget_spent == 8
    assert len(trained) == len(set(trained)) == 8
    assert {d["worker"] for d in tuner.optimizer.decisions} == set(ray_executor.labels)
    assert not tuner.optimizer.running and "running" not in StudyDirectory(tmp_path / "s").load_state()
    paused = [t for t in tuner.optimizer.trials.values() if t.status == TrialStatus.PAUSED]
    assert len(list((tmp_path / "s" / "trials").glob("*/*.ckpt"))) == len(paused)
    assert "ray-w" in (tmp_path / "s" / "trajectory.csv").read_text()


def test_a_sync_rerun_with_the_same_seed_makes_the_same_decisions(sync, hub, tmp_path, fast_surrogate):
    tuners = []
    for i in range(2):
        tuner = tuner_for(hub, tmp_path / f"s{i}", sync, fast_surrogate, budget=6)
        tuner.run()
        tuners.append(tuner)
    runs = [decisions(t) for t in tuners]
    assert runs[0] == runs[1]
    assert len({(t, e) for _, t, e, _ in runs[0]}) == 6


def test_a_one_worker_ray_study_equals_the_in_process_study(ray_cluster, hub, tmp_path, fast_surrogate):
    in_process = tuner_for(hub, tmp_path / "local", epoch_executor(hub), fast_surrogate, budget=6)
    in_process.run()
    with RayExecutor(epoch_executor(hub), address=ray_cluster.address, workers=1, mode="sync") as executor:
        on_ray = tuner_for(hub, tmp_path / "ray", executor, fast_surrogate, budget=6)
        on_ray.run()
    assert decisions(on_ray) == decisions(in_process)
    best = [torch.load(tmp_path / name / "best.ckpt", weights_only=True)["state_dict"] for name in ("local", "ray")]
    assert best[0].keys() == best[1].keys() and all(torch.equal(best[0][k], best[1][k]) for k in best[0])
