"""A Ray cluster on loopback for the session, started once and stopped with every process it started.

``ray start --head`` runs in a process group of its own, in Ray's single-host mode
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) so that everything listens on 127.0.0.1, with token authentication
and usage statistics off. The test process connects to it as a driver; the executors of the tests attach to
that connection. At the end every process of the cluster (the head's tree, workers included: they run in process
groups of their own) is killed by its id.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_fms.testing.ray_cluster import (
    RAY_TEST_ENVIRONMENT,
    LoopbackCluster,
    free_loopback_port,
    stop_processes,
)


@pytest.fixture(scope="session")
def ray_environment() -> Iterator[dict[str, str]]:
    """The environment every Ray process of the tests needs (set for the session, restored after)."""
    saved = {key: os.environ.get(key) for key in RAY_TEST_ENVIRONMENT}
    os.environ.update(RAY_TEST_ENVIRONMENT)
    yield dict(RAY_TEST_ENVIRONMENT)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_cluster(ray_environment, tmp_path_factory) -> Iterator[LoopbackCluster]:
    """A Ray cluster on 127.0.0.1 for the session (4 logical CPUs: two executors' workers at once); the test
    process is its driver."""
    ray = pytest.importorskip("ray")
    port = free_loopback_port()
    log = tmp_path_factory.mktemp("ray") / "head.log"
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "4", "--num-gpus", "0",
        "--include-dashboard", "false", "--disable-usage-stats",
    ]  # fmt: skip
    with Path(log).open("w") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = LoopbackCluster(f"127.0.0.1:{port}", head)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                ray.init(address=cluster.address, log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the test Ray cluster did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        cluster.processes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.processes()
        stop_processes(cluster.seen)  # a graceful stop of raylet and GCS takes half a minute
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=20)


@pytest.fixture(scope="session")
def ray_executor(ray_cluster, hub):
    """Two workers on the session's cluster training lightning_fms/testing/ray_trials.py's classifier, shared by the tests."""
    from lightning_fms.parallel.ray_executor import RayExecutor
    from lightning_fms.testing.ray_trials import epoch_executor

    executor = RayExecutor(epoch_executor(hub), address=ray_cluster.address, workers=2)
    executor.start()
    yield executor
    executor.close()
