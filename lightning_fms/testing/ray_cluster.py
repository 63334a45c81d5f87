"""Helpers of the tests that start Ray clusters on loopback: the environment, process trees, listening sockets.

Every process a test cluster starts is found by its id (a cluster's workers run in process groups of their own)
and stopped by its id, never with a command that stops every Ray process on the machine.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from dataclasses import dataclass, field

RAY_TEST_ENVIRONMENT = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_tree(pid: int) -> set[int]:
    """``pid`` and every process below it."""
    import psutil

    try:
        root = psutil.Process(pid)
        return {pid, *(child.pid for child in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def listening_addresses(pids: set[int]) -> list[tuple[str, str, int]]:
    """``(process name, address, port)`` of every TCP socket the processes listen on."""
    import psutil

    found = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            process = psutil.Process(pid)
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    found.append((process.name(), connection.laddr.ip, connection.laddr.port))
    return found


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address (``::ffff:127.0.0.1``)."""
    import ipaddress

    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def stop_processes(pids: set[int], timeout: float = 15.0) -> None:
    """SIGKILL each process still alive, by its id, and reap it (a test cluster keeps nothing worth a drain)."""
    import psutil

    alive = [p for pid in pids if (p := _process(pid)) is not None]
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=timeout)


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@dataclass
class LoopbackCluster:
    """A ``ray start --head`` cluster on 127.0.0.1 that the test process is connected to."""

    address: str
    head: subprocess.Popen
    seen: set[int] = field(default_factory=set)

    def processes(self) -> set[int]:
        """The cluster's processes now (remembered, so that teardown stops them all)."""
        self.seen |= process_tree(self.head.pid)
        return process_tree(self.head.pid)
