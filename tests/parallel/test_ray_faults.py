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
from lightning_fms.testing.executors import ExecutorContract
from lightning_fms.testing.fault_trials import MY_NODES, epoch_executor, study_options
from lightning_fms.testing.ray_cluster import RAY_TEST_ENVIRONMENT, is_loopback, listening_addresses
from lightning_fms.testing.ray_nodes import start_node
from lightning_fms.training.executor import EpochJob

TESTS = Path(__file__).resolve().parents[1]  # the folder above this package (tests/ is not a package itself)
REPO = TESTS.parent
CNN = {"hub": "cnn-xs", "model.lr": 0.05}


@pytest.fixture(scope="module")
def gpu_node(ray_cluster, tmp_path_factory):
    """A node with 8 (logical) CPUs and 2 (logical) GPUs, where the tests' workers run."""
    node = start_node(
        ray_cluster.address,
        "fault-gpus",
        tmp_path_factory.mktemp("ray-nodes") / "gpus.log",
        cpus=8,
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
def test_frozen_epochs_pack_more_per_gpu_within_the_declared_gpus(packed, gpu_node, tmp_path):
    import ray

    sockets = listening_addresses(gpu_node.processes())  # the node the tests add stays on loopback too
    assert sockets and [s for s in sockets if not is_loopback(s[1])] == []
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
    assert {p.share for p in frozen} == {0.375} and "queued" not in runs["frozen"][0]
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
    assert [(p.share, p.out_of_memory) for p in stays] == [(0.375, True), (0.75, False)]
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


class TestPackedRayExecutor(ExecutorContract):
    """The executor contract through ``run_epoch`` with GPU packing (each epoch at its share of a logical GPU)."""

    @pytest.fixture(autouse=True)
    def _executor(self, packed):
        self.executor = packed

    def make_executor(self):
        return self.executor

    def trial_config(self):
        return {**CNN, "model.step_delay": 0.0}

    def hub_entry(self, config):
        return config["hub"]

    def failing_config(self):
        return {**CNN, "model.step_delay": 0.0, "model.lr": 1e30}


def test_a_frozen_layer_study_packs_its_epochs_within_the_budget(packed, hub, tmp_path):
    first = len(packed.seats.packer.placements)
    tuner = FMSTuner(executor=packed, **study_options(hub, tmp_path / "s", budget=3, frozen_layers=[0.25]))
    tuner.run()
    optimizer = tuner.optimizer
    assert optimizer.budget_spent <= 3 + 1e-9 and not optimizer.running
    assert len(set(trained(optimizer.decisions))) == len(optimizer.decisions)
    stays = packed.seats.packer.placements[first:]
    fractions = {(int(d["trial"]), int(d["epoch"])): float(d["trainable_fraction"]) for d in optimizer.decisions}
    assert 0.25 in fractions.values()  # the study trained some epochs at a quarter of the layers ...
    for stay in stays:  # ... and those got less of a GPU than the full ones
        assert stay.share < 0.75 if fractions[(stay.trial_id, stay.epoch)] < 1.0 else stay.share == 0.75
    assert all(held <= 1.0 + 1e-9 for held in most_held(stays).values())
    assert {d["worker"] for d in optimizer.decisions} <= set(packed.labels)


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


class KilledDriver(threading.Thread):
    """A driver process attached to the session's cluster runs a study, is killed with -9 mid-study (after two
    committed epochs, while epochs train), and the same command runs again; what a rerun finds is planted too (a
    torn temporary file). It runs alongside the module's other tests: it is mostly waiting."""

    def __init__(self, address: str, hub_file: Path, folder: Path, budget: int = 6) -> None:
        super().__init__(daemon=True)
        self.study_dir, self.budget, self.log = folder / "s", budget, folder / "driver.log"
        self.command = [sys.executable, "-m", "lightning_fms.testing.fault_driver", address, str(hub_file)]
        self.command += [str(self.study_dir), str(budget)]
        path = os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])
        self.env = {**os.environ, **RAY_TEST_ENVIRONMENT, "PYTHONPATH": path}
        self.driver: subprocess.Popen | None = None
        self.workers: dict[str, int] = {}
        self.fault = Fault(self.study_dir, lambda trial, epoch, pid: self.driver.kill())
        self.killed: int | None = None
        self.left: dict = {}
        self.stale = self.study_dir / "stale"
        self.rerun: subprocess.CompletedProcess | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.log.open("w") as log:
                self.driver = subprocess.Popen(
                    self.command, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=log, text=True
                )
                self.workers = json.loads(self.driver.stdout.readline())["workers"]
                self.fault.run()  # until it kills the driver
                self.killed = self.driver.wait(timeout=30)
                self.left = StudyDirectory(self.study_dir).load_state() or {}
                trial, epoch, _ = self.fault.target
                self.stale = StudyDirectory(self.study_dir).trial_dir(trial) / f".epoch-{epoch}.d99.ckpt.123.tmp"
                self.stale.write_bytes(b"a torn write")  # what a write cut off by the kill leaves
                self.rerun = subprocess.run(
                    self.command, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=log, text=True, timeout=300
                )
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error

    def close(self) -> None:
        """Kill the first driver if it is still alive (a failed scenario)."""
        if self.driver is not None and self.driver.poll() is None:
            self.driver.kill()
            self.driver.wait(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def killed_driver(request, ray_cluster, gpu_node, hub_file, tmp_path_factory):
    """The driver-kill scenario, started with the module (:func:`test_a_driver_killed_with_minus_9_and_rerun`)."""
    if not any(item.name == "test_a_driver_killed_with_minus_9_and_rerun" for item in request.session.items):
        yield None  # not selected
        return
    scenario = KilledDriver(ray_cluster.address, hub_file, tmp_path_factory.mktemp("killed-driver"))
    scenario.start()
    yield scenario
    scenario.close()
    scenario.join(timeout=60)


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
        workers=1,
        cpus_per_trial=1,
        worker_options={**MY_NODES, "scheduling_strategy": prefer_it},
    )
    try:
        executor.start()
        assert set(executor.worker_pids.values()) <= node.processes()  # the worker is on the doomed node
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
        assert not set(executor.worker_pids.values()) & node.seen  # the worker came back on another node
    finally:
        executor.close()
        node.stop()
    assert not [pid for pid in node.seen if psutil.pid_exists(pid)]


def test_a_driver_killed_with_minus_9_and_rerun(killed_driver):
    killed_driver.join(timeout=400)
    assert not killed_driver.is_alive(), "the driver scenario did not end"
    assert killed_driver.error is None, killed_driver.error
    fault, budget = killed_driver.fault, killed_driver.budget
    assert fault.error is None and fault.prefix is not None, fault.error
    assert killed_driver.killed == -signal.SIGKILL
    assert killed_driver.left.get("running"), "the killed driver left no claim to give back"
    rerun = killed_driver.rerun
    assert rerun.returncode == 0, killed_driver.log.read_text()[-3000:]
    assert json.loads(rerun.stdout.strip().splitlines()[-1]) == {"epochs_spent": budget}
    state = StudyDirectory(killed_driver.study_dir).load_state()
    log = [(int(d["trial"]), int(d["epoch"]), d["value"]) for d in state["decisions"]]
    assert len(log) == len(set((t, e) for t, e, _ in log)) == budget
    assert log[: len(fault.prefix)] == fault.prefix and "running" not in state
    assert not killed_driver.stale.exists() and not list(killed_driver.study_dir.rglob("*.tmp"))
    deadline = time.monotonic() + 30  # the killed driver's workers went with it
    while alive := [pid for pid in killed_driver.workers.values() if psutil.pid_exists(pid)]:
        assert time.monotonic() < deadline, f"workers of the killed driver still alive: {alive}"
        time.sleep(0.2)
