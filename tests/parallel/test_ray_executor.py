"""RayExecutor on a real Ray cluster on loopback: the executor contract, epochs at once, lost workers, set-up errors.

One 2-worker executor on the session's cluster (tests/parallel/conftest.py) serves every test, so the workers are
started (and their imports warmed) once; they train lightning_fms/testing/ray_trials.py's classifier.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lightning_fms.errors import FMSError
from lightning_fms.parallel.protocol import Finished, is_concurrent
from lightning_fms.parallel.ray_executor import STORAGE_MARKER, RayExecutor
from lightning_fms.testing.executors import ExecutorContract
from lightning_fms.testing.ray_cluster import RAY_TEST_ENVIRONMENT, is_loopback, listening_addresses
from lightning_fms.training.executor import EpochJob

CONFIG = {"hub": "cnn-s", "model.lr": 0.05, "model.dropout": 0.3}
SLOW = {**CONFIG, "model.step_delay": 0.1}  # over a second an epoch: long enough to be killed in


def job(folder: Path, trial_id: int, config=CONFIG, epoch: int = 1, **options) -> EpochJob:
    fields = {"seed": 0, "monitor": "val_acc", "cap": ExecutorContract.cap, **options}
    return EpochJob(
        trial_id=trial_id,
        config=dict(config),
        epoch=epoch,
        resume_from=None,
        checkpoint_out=folder / "trials" / str(trial_id) / f"epoch-{epoch}.ckpt",
        log_dir=folder / "trials" / str(trial_id),
        **fields,
    )


def wait_for(executor: RayExecutor, count: int, timeout: float = 120) -> list[Finished]:
    finished: list[Finished] = []
    deadline = time.monotonic() + timeout
    while len(finished) < count:
        assert time.monotonic() < deadline, f"only {len(finished)} of {count} epochs ended"
        finished += executor.wait(timeout=5)
    return finished


class TestRayExecutor(ExecutorContract):
    """The executor contract through ``run_epoch``: each epoch runs on a Ray worker, the driver waits."""

    @pytest.fixture(autouse=True)
    def _executor(self, ray_executor):
        self.executor = ray_executor

    def make_executor(self):
        return self.executor

    def trial_config(self):
        return dict(CONFIG)

    def hub_entry(self, config):
        return config["hub"]

    def failing_config(self):
        return {**CONFIG, "model.lr": 1e30}


def test_two_epochs_run_at_once_on_two_workers(ray_executor, tmp_path):
    assert is_concurrent(ray_executor) and ray_executor.workers == 2
    labels = [ray_executor.submit(job(tmp_path, trial_id, SLOW)) for trial_id in (1, 2)]
    assert sorted(labels) == ["ray-w1@127.0.0.1", "ray-w2@127.0.0.1"]
    with pytest.raises(FMSError, match="all 2 Ray workers are busy"):
        ray_executor.submit(job(tmp_path, 3))
    started = time.perf_counter()
    finished = wait_for(ray_executor, 2)
    both = time.perf_counter() - started
    assert {f.worker for f in finished} == set(labels)
    assert [f.job.trial_id for f in finished] == sorted(f.job.trial_id for f in finished)  # submission order
    for item in finished:
        assert item.lost is None and item.outcome.error is None, item
        assert item.outcome.weights is None  # small: no weights unless the job asks
        assert item.job.checkpoint_out.exists()
        torch.load(item.job.checkpoint_out, map_location="cpu", weights_only=True)
    walls = [f.outcome.wall_s for f in finished]
    assert both < sum(walls), (both, walls)  # they overlapped
    assert ray_executor.wait(timeout=0) == []  # nothing in flight


def test_a_worker_killed_mid_epoch_is_lost_and_the_next_epoch_runs_on_its_restart(ray_executor, tmp_path):
    first = ray_executor.labels[0]
    pid = ray_executor.worker_pids[first]
    doomed = job(tmp_path, 1, SLOW)
    assert ray_executor.submit(doomed) == first
    deadline = time.monotonic() + 60
    while not (doomed.log_dir / "logs").exists():  # the fit has begun
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    (lost,) = wait_for(ray_executor, 1)
    assert lost.outcome is None and lost.worker == first
    assert lost.lost.startswith(f"{first} was lost mid-epoch") and "\n" not in lost.lost
    assert not doomed.checkpoint_out.exists()
    again = [job(tmp_path, 2), job(tmp_path, 3)]
    second = ray_executor.submit(again[0])  # the healthy worker first ...
    assert second != first
    assert ray_executor.submit(again[1]) == first  # ... then the lost one, once Ray has restarted it
    assert ray_executor.worker_pids[first] not in (None, pid)
    done = wait_for(ray_executor, 2)
    assert [f.worker for f in done] == [second, first]
    assert all(f.lost is None and f.outcome.error is None and f.job.checkpoint_out.exists() for f in done)


def test_a_setup_error_on_a_worker_is_raised_by_wait_in_one_line(ray_executor, tmp_path):
    ray_executor.submit(job(tmp_path, 1, monitor="val_loss"))  # the epoch executor was built for val_acc
    with pytest.raises(FMSError, match="the study monitors 'val_loss' but the executor was built") as error:
        wait_for(ray_executor, 1)
    assert "\n" not in str(error.value)
    assert ray_executor.wait(timeout=0) == [] and len(ray_executor.labels) == 2
    ray_executor.submit(job(tmp_path, 2))  # the workers go on
    assert wait_for(ray_executor, 1)[0].outcome.error is None


@pytest.mark.parametrize("change", ["deleted", "another file"])
def test_a_worker_that_does_not_see_the_study_directory_fails_in_one_line(ray_executor, tmp_path, change):
    unshared = job(tmp_path, 1)
    ray_executor._mark_storage(unshared)  # the driver's marker, as submit writes it ...
    marker = unshared.log_dir.parent / STORAGE_MARKER
    if change == "deleted":  # ... and what a node that does not share the folder sees instead
        marker.unlink()
        expected = "cannot see"
    else:
        marker.write_text("a folder of the same name on another node\n")
        expected = "sees another"
    ray_executor.submit(unshared)
    with pytest.raises(FMSError, match=f"Ray worker 1 on 127.0.0.1 {expected} .*shared by the driver") as error:
        wait_for(ray_executor, 1)
    assert "\n" not in str(error.value) and not unshared.checkpoint_out.exists()


def test_the_cluster_listens_on_loopback_only(ray_cluster, ray_executor):
    pids = ray_cluster.processes()
    assert set(ray_executor.worker_pids.values()) <= pids  # the workers are the cluster's processes
    sockets = listening_addresses(pids)
    assert sockets, "found no listening socket of the cluster"
    assert [s for s in sockets if not is_loopback(s[1])] == []


def test_driver_side_answers_come_from_the_epoch_executor(ray_executor, hub):
    module = ray_executor.pretrained_module("cnn-s")
    reference = hub.build("cnn-s")
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in module.state_dict().items())
    costs = ray_executor.frozen_layer_costs([dict(CONFIG)], (0.5, 1.0))
    assert len(costs) == 1 and costs[0][-1] == pytest.approx(1.0)


# ------------------------------------------------------------------ a local cluster, and no ray at all
LOCAL_CLUSTER = textwrap.dedent(
    """
    import json, os, sys
    from lightning_fms.parallel.ray_executor import RayExecutor
    sys.path.insert(0, sys.argv[1])
    from lightning_fms.testing.ray_cluster import listening_addresses, process_tree

    executor = RayExecutor(lambda: None, workers=1, cpus_per_trial=0.5)  # a worker with nothing to train
    import ray
    executor.start()
    pids = process_tree(os.getpid()) - {os.getpid()}  # the cluster this driver started, its worker included
    assert set(executor.worker_pids.values()) <= pids, (executor.worker_pids, pids)
    print(json.dumps({"sockets": listening_addresses(pids), "pids": sorted(pids)}))
    executor.close()
    executor.close()
    print(json.dumps({"connected": ray.is_initialized()}))
    """
)


@pytest.fixture(scope="session", autouse=True)
def local_cluster_run(ray_environment, tmp_path_factory):
    """A driver process that starts a local cluster through RayExecutor (address None) and closes it.

    It starts first, before the session's cluster, and runs alongside the other tests (both are mostly waiting);
    :func:`test_a_local_cluster_is_on_loopback_and_close_stops_it` reads what it printed.
    """
    env = {**os.environ, **RAY_TEST_ENVIRONMENT}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # the executor must keep a local cluster on loopback itself
    run = subprocess.Popen(
        [sys.executable, "-c", LOCAL_CLUSTER, str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path_factory.mktemp("local-cluster"),
    )
    yield run
    if run.poll() is None:
        run.kill()
        run.communicate()


def test_a_local_cluster_is_on_loopback_and_close_stops_it(local_cluster_run):
    import json

    import psutil

    out, err = local_cluster_run.communicate(timeout=240)
    assert local_cluster_run.returncode == 0, err[-3000:]
    first, second = (json.loads(line) for line in out.strip().splitlines()[-2:])
    assert first["sockets"] and [s for s in first["sockets"] if not is_loopback(s[1])] == []
    assert second == {"connected": False}
    deadline = time.monotonic() + 30
    while alive := [pid for pid in first["pids"] if psutil.pid_exists(pid)]:
        if time.monotonic() > deadline:
            pytest.fail(f"processes of the local cluster still alive after close(): {alive}")
        time.sleep(0.2)


NO_RAY = textwrap.dedent(
    """
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ImportError("blocked: " + name)
    sys.meta_path.insert(0, Block())
    from lightning_fms.errors import FMSError
    from lightning_fms.parallel.ray_executor import RayExecutor
    try:
        RayExecutor(lambda: None)
    except FMSError as error:
        print(error)
    """
)


def test_without_ray_the_executor_names_the_extra_in_one_line():
    done = subprocess.run([sys.executable, "-c", NO_RAY], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "RayExecutor needs the ray package: pip install 'lightning_fms[ray]'"
