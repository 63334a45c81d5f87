"""Faults survived, and GPUs shared, on the session's loopback Ray cluster with nodes these tests add and stop.

Every study here ends with the budget exact, no (trial, epoch) trained twice and every epoch committed before the
fault kept. The GPUs are Ray's logical ones (a node started with two on this CPU machine): Ray holds the workers
to them, the executor hands out the shares, and nothing here can check real device memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from lightning_fms import FMSTuner
from lightning_fms.parallel.gpu_packing import Placement
from lightning_fms.parallel.protocol import Finished
from lightning_fms.parallel.ray_executor import RayExecutor
from lightning_fms.study.directory import StudyDirectory
from lightning_fms.training.executor import EpochJob

from .conftest import RAY_TEST_ENVIRONMENT, is_loopback, listening_addresses
from .fault_trials import MY_NODES, epoch_executor, study_options
from .ray_nodes import start_node

TESTS = Path(__file__).resolve().parents[1]  # the folder above this package (tests/ is not a package itself)
REPO = TESTS.parent
CNN = {"hub": "cnn-xs", "model.lr": 0.05}


@pytest.fixture(scope="module")
def gpu_node(ray_cluster, tmp_path_factory):
    """A node with 4 CPUs and 2 (logical) GPUs, where the tests' workers run."""
    node = start_node(
        ray_cluster.address,
        "fault-gpus",
        tmp_path_factory.mktemp("ray-nodes") / "gpus.log",
        cpus=4,
        gpus=2,
        resources={"fault-tests": 8},
    )
    yield node
    node.stop()


@pytest.fixture(scope="module")
def packed(ray_cluster, gpu_node, hub):
    """Three workers sharing the two GPUs (GPU packing: an epoch at full training gets 0.75 of a GPU)."""
    executor = RayExecutor(
        epoch_executor(hub, step_delay=0.05),
        address=ray_cluster.address,
        workers=3,
        cpus_per_trial=0.5,
        gpus_per_trial=0.75,
        worker_options=MY_NODES,
    )
    executor.start()
    yield executor
    executor.close()


def job(folder: Path, trial_id: int, config: dict, fraction: float | None = None, epoch: int = 1) -> EpochJob:
    trial_dir = folder / "trials" / str(trial_id)
    return EpochJob(
        trial_id=trial_id,
        config=dict(config),
        epoch=epoch,
        resume_from=None,
        checkpoint_out=trial_dir / f"epoch-{epoch}.ckpt",
        log_dir=trial_dir,
        seed=0,
        monitor="val_acc",
        cap=3,
        trainable_fraction=fraction,
    )


def wait_for(executor: RayExecutor, count: int, timeout: float = 120) -> list[Finished]:
    finished: list[Finished] = []
    deadline = time.monotonic() + timeout
    while len(finished) < count:
        assert time.monotonic() < deadline, f"only {len(finished)} of {count} epochs ended"
        finished += executor.wait(timeout=1)
    return finished


def peak_concurrency(stays: list[Placement]) -> int:
    events = sorted([(p.started, 1) for p in stays] + [(p.ended, -1) for p in stays], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def most_held(stays: list[Placement]) -> dict[tuple[str, str], float]:
    """Per GPU, the largest sum of shares held at one moment."""
    held: dict[tuple[str, str], float] = {}
    for moment in [p.started for p in stays]:
        for gpu in {p.gpu for p in stays}:
            now = sum(p.share for p in stays if p.gpu == gpu and p.started <= moment < p.ended)
            held[gpu] = max(held.get(gpu, 0.0), now)
    return held


# ------------------------------------------------------------------ GPU packing and out of memory
def test_frozen_epochs_pack_more_per_gpu_within_the_declared_gpus(packed, tmp_path):
    import ray

    assert {label.rsplit("/gpu", 1)[1] for label in packed.labels} == {"0", "1"}  # the seats sit on both GPUs
    assert ray.available_resources().get("GPU", 0.0) == pytest.approx(0.5)  # Ray's books: 3 seats of half a GPU
    slow = {**CNN, "model.step_delay": 0.08}
    runs = {}
    for name, fraction in (("full", None), ("frozen", 0.25)):
        first = len(packed.seats.packer.placements)
        jobs = [job(tmp_path / name, trial_id, slow, fraction) for trial_id in (1, 2, 3)]
        labels = [packed.submit(j) for j in jobs]
        finished = wait_for(packed, 3)
        assert all(f.outcome is not None and f.outcome.error is None for f in finished), finished
        runs[name] = (labels, packed.seats.packer.placements[first:])
    full, frozen = runs["full"][1], runs["frozen"][1]
    assert {p.share for p in full} == {0.75} and runs["full"][0].count("queued") == 1  # one GPU each
    assert {p.share for p in frozen} == {0.125} and "queued" not in runs["frozen"][0]
    assert peak_concurrency(full) == 2 and peak_concurrency(frozen) == 3
    for stays in (full, frozen):  # never more of a GPU than it has, never more GPUs than the cluster has
        assert all(held <= 1.0 + 1e-9 for held in most_held(stays).values())
        assert len({p.gpu for p in stays}) <= 2


def test_out_of_memory_is_run_again_with_twice_the_share(packed, tmp_path):
    first = len(packed.seats.packer.placements)
    trial = job(tmp_path, 1, {**CNN, "model.oom_attempts": 1}, fraction=0.25)
    packed.submit(trial)
    (ended,) = wait_for(packed, 1)
    assert ended.outcome.error is None and math.isfinite(ended.outcome.value)
    stays = packed.seats.packer.placements[first:]
    assert [(p.share, p.out_of_memory) for p in stays] == [(0.125, True), (0.25, False)]
    assert trial.checkpoint_out.exists()


def test_out_of_memory_with_a_whole_gpu_fails_the_trial_in_one_line(packed, tmp_path):
    first = len(packed.seats.packer.placements)
    packed.submit(job(tmp_path, 1, {**CNN, "model.oom_attempts": 9}))
    (ended,) = wait_for(packed, 1)
    assert [p.share for p in packed.seats.packer.placements[first:]] == [0.75, 1.0]
    assert ended.outcome.error == (
        "CUDA out of memory with a whole GPU (GPU shares tried: 0.75, 1): OutOfMemoryError: CUDA out of memory. "
        "Tried to allocate 2.00 GiB (a test's module)"
    )
    assert not ended.job.checkpoint_out.exists()


# ------------------------------------------------------------------ faults during a study
def trained(decisions: list[dict]) -> list[tuple[int, int]]:
    return [(int(d["trial"]), int(d["epoch"])) for d in decisions]


def committed(study_dir: Path) -> list[tuple[int, int, float]]:
    state = StudyDirectory(study_dir).load_state() or {}
    return [(int(d["trial"]), int(d["epoch"]), d["value"]) for d in state.get("decisions", [])]


def in_flight(study_dir: Path) -> list[tuple[int, int]]:
    state = StudyDirectory(study_dir).load_state() or {}
    return [(int(t), int(c["epoch"])) for t, c in state.get("running", {}).items()]


class Fault(threading.Thread):
    """Waits until the study has committed ``after`` epochs and an epoch is training, then strikes.

    ``strike(trial, epoch, pid)`` gets the epoch that is training and the pid of its worker process. Before it
    strikes, :attr:`prefix` takes the committed decision log from disk.
    """

    def __init__(self, study_dir: Path, strike: Callable[[int, int, int], None], after: int = 2) -> None:
        super().__init__(daemon=True)
        self.study_dir, self.strike, self.after = study_dir, strike, after
        self.prefix: list[tuple[int, int, float]] | None = None
        self.target: tuple[int, int, int] | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                time.sleep(0.05)
                if len(committed(self.study_dir)) < self.after:
                    continue
                for trial, epoch in in_flight(self.study_dir):
                    pid_file = StudyDirectory(self.study_dir).trial_dir(trial) / f"pid-e{epoch}"
                    if pid_file.exists() and time.time() - pid_file.stat().st_mtime < 0.3:  # it has just begun
                        self.prefix = committed(self.study_dir)
                        self.target = (trial, epoch, int(pid_file.read_text()))
                        self.strike(*self.target)
                        return
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error


def check_study(tuner: FMSTuner, fault: Fault, budget: int, given_back: str) -> None:
    """Budget exact, no epoch twice, the committed prefix kept, the struck epoch given back (and, if it was trained
    later, trained by another process)."""
    optimizer = tuner.optimizer
    assert fault.error is None and fault.prefix is not None, fault.error
    assert optimizer.epochs_spent == budget and optimizer.budget_spent == budget
    log = [(int(d["trial"]), int(d["epoch"]), d["value"]) for d in optimizer.decisions]
    assert len(log) == budget and len(set(trained(optimizer.decisions))) == budget
    assert log[: len(fault.prefix)] == fault.prefix
    assert not optimizer.running and "running" not in StudyDirectory(tuner.study.path).load_state()
    trial, epoch, pid = fault.target
    assert f"trial {trial} epoch {epoch}: worker" in given_back and "given back" in given_back
    if (trial, epoch) in set(trained(optimizer.decisions)):
        assert int((tuner.study.trial_dir(trial) / f"pid-e{epoch}").read_text()) != pid


def test_a_worker_killed_mid_epoch_during_a_study(packed, hub, tmp_path, caplog):
    study_dir = tmp_path / "s"
    fault = Fault(study_dir, lambda trial, epoch, pid: os.kill(pid, signal.SIGKILL))
    tuner = FMSTuner(executor=packed, **study_options(hub, study_dir, budget=6))
    fault.start()
    with caplog.at_level(logging.WARNING, logger="lightning_fms.parallel.driver"):
        tuner.run()
    fault.stop.set()
    fault.join()
    check_study(tuner, fault, 6, caplog.text)
    assert len(packed.labels) == 3  # the killed worker came back


def test_a_node_stopped_mid_study(ray_cluster, gpu_node, hub, tmp_path, caplog):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = start_node(
        ray_cluster.address, "fault-doomed", tmp_path / "doomed.log", cpus=2, resources={"fault-tests": 2}
    )
    prefer_it = NodeAffinitySchedulingStrategy(node.node_id, soft=True)  # soft: elsewhere once it is gone
    executor = RayExecutor(
        epoch_executor(hub, step_delay=0.05),
        address=ray_cluster.address,
        workers=2,
        cpus_per_trial=1,
        worker_options={**MY_NODES, "scheduling_strategy": prefer_it},
    )
    try:
        executor.start()
        assert set(executor.worker_pids.values()) <= node.processes()  # both workers on the doomed node
        sockets = listening_addresses(node.processes())
        assert sockets and [s for s in sockets if not is_loopback(s[1])] == []
        study_dir = tmp_path / "s"
        fault = Fault(study_dir, lambda trial, epoch, pid: node.stop())
        tuner = FMSTuner(executor=executor, **study_options(hub, study_dir, budget=6))
        fault.start()
        with caplog.at_level(logging.WARNING, logger="lightning_fms.parallel.driver"):
            tuner.run()
        fault.stop.set()
        fault.join()
        check_study(tuner, fault, 6, caplog.text)
        assert not set(executor.worker_pids.values()) & node.seen  # the workers came back on another node
    finally:
        executor.close()
        node.stop()
    assert not [pid for pid in node.seen if psutil.pid_exists(pid)]


def test_a_driver_killed_with_minus_9_and_rerun(ray_cluster, gpu_node, hub_file, hub, tmp_path):
    study_dir, budget = tmp_path / "s", 6
    command = [sys.executable, "-m", f"{__package__}.fault_driver", ray_cluster.address, str(hub_file)]
    command += [str(study_dir), str(budget)]
    env = {
        **os.environ,
        **RAY_TEST_ENVIRONMENT,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = json.loads(driver.stdout.readline())["workers"]
        fault = Fault(study_dir, lambda trial, epoch, pid: driver.kill())
        fault.run()  # here, not in a thread: until the driver is killed
        assert fault.error is None and fault.prefix is not None, fault.error
        driver.wait(timeout=20)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.communicate()
    assert driver.returncode == -signal.SIGKILL
    left = StudyDirectory(study_dir).load_state()
    assert left["running"], "the killed driver left no claim to give back"
    stale = StudyDirectory(study_dir).trial_dir(fault.target[0]) / f".epoch-{fault.target[1]}.d99.ckpt.123.tmp"
    stale.write_bytes(b"a torn write")  # what a write cut off by the kill leaves

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout.strip().splitlines()[-1]) == {"epochs_spent": budget}
    state = StudyDirectory(study_dir).load_state()
    log = [(int(d["trial"]), int(d["epoch"]), d["value"]) for d in state["decisions"]]
    assert len(log) == len(set((t, e) for t, e, _ in log)) == budget
    assert log[: len(fault.prefix)] == fault.prefix and "running" not in state
    assert not stale.exists() and not list(study_dir.rglob("*.tmp"))
    deadline = time.monotonic() + 30  # the killed driver's workers went with it
    while alive := [pid for pid in workers.values() if psutil.pid_exists(pid)]:
        assert time.monotonic() < deadline, f"workers of the killed driver still alive: {alive}"
        time.sleep(0.2)
