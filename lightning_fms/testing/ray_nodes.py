"""More nodes for the session's loopback Ray cluster, each started and stopped by the test that needs it.

``ray start --address`` refuses to start a second node in Ray's single-host mode
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), and without that mode the node would advertise the machine's interface
address and listen beyond loopback. So a node is started here the way ``ray start --address ... --block`` starts
one, through Ray's node launcher (``ray._private.node.Node``) in a process of its own, in single-host mode: every
address stays 127.0.0.1. Stopping a node stops exactly the processes it started: the raylet first with SIGTERM (as
``ray stop`` does: the cluster marks the node dead at once), then every process of the node, by its id.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightning_fms.testing.ray_cluster import RAY_TEST_ENVIRONMENT, process_tree, stop_processes

NODE = textwrap.dedent(
    """
    import json, sys, time
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    address, name, cpus, gpus, resources = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    params = RayParams(
        node_ip_address="127.0.0.1", node_name=name, gcs_address=address, num_cpus=cpus, num_gpus=gpus,
        resources=json.loads(resources), include_log_monitor=False,
    )
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(json.dumps({"node_id": node.node_id}), flush=True)
    while True:
        time.sleep(1)
    """
)


@dataclass
class RayNode:
    """A worker node of the test cluster (on 127.0.0.1), its processes remembered for :meth:`stop`."""

    name: str
    node_id: str
    launcher: subprocess.Popen
    seen: set[int] = field(default_factory=set)

    def processes(self) -> set[int]:
        """The node's processes now (remembered)."""
        now = process_tree(self.launcher.pid)
        self.seen |= now
        return now

    def stop(self) -> None:
        """Stop the node: SIGTERM its raylet (the cluster marks the node dead), then kill every process it started."""
        import psutil

        for pid in self.processes():
            try:
                if psutil.Process(pid).name() == "raylet":
                    os.kill(pid, signal.SIGTERM)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        time.sleep(0.5)
        self.processes()
        stop_processes(self.seen)
        self.launcher.wait(timeout=20)


def start_node(
    address: str, name: str, log: Path, cpus: float, gpus: float = 0, resources: dict | None = None
) -> RayNode:
    """Start a worker node of the cluster at ``address`` and wait until the cluster lists it as alive."""
    import ray

    env = {**os.environ, **RAY_TEST_ENVIRONMENT}
    command = [sys.executable, "-c", NODE, address, name, str(cpus), str(gpus), json.dumps(resources or {})]
    with log.open("w") as out:
        launcher = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        alive = [n for n in ray.nodes() if n["Alive"] and n.get("NodeName") == name]
        if alive:
            node = RayNode(name, alive[0]["NodeID"], launcher)
            node.processes()
            return node
        if launcher.poll() is not None or time.monotonic() > deadline:
            stop_processes(process_tree(launcher.pid) | {launcher.pid})
            raise RuntimeError(f"the Ray node {name} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
