"""The Ray actor behind each of a :class:`~lightning_fms.parallel.ray_executor.RayExecutor`'s workers.

:class:`EpochWorker` lives in a process of the cluster for the whole study: it builds its epoch executor once
(imports, trial builder, hub), checks once per study directory that it sees the driver's storage marker, and
trains the epochs it is sent (holding a share of its GPU, with GPU packing), returning small results.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning_fms.errors import FMSError, one_line
from lightning_fms.parallel.gpu_packing import gpu_share
from lightning_fms.training.executor import EpochJob, Executor

__all__ = ["STORAGE_MARKER", "EpochWorker", "is_executor"]

STORAGE_MARKER = ".ray-storage"
"""The marker file the driver writes next to the trial folders; a worker must read the driver's token from it."""


def is_executor(obj: object) -> bool:
    """An epoch executor instance (not a class, not a factory)."""
    return not isinstance(obj, type) and callable(getattr(obj, "run_epoch", None))


class EpochWorker:
    """The Ray actor of one slot: builds its epoch executor once and trains the epochs it is sent.

    Args:
        executor: The epoch executor, or a callable without arguments that builds it (called here, once), pickled
            by the driver (unpickled here once the driver's import path is in place).
        index: The slot's index (for its label).
        cwd: The driver's working directory: the worker works there when it exists on this node, so relative
            paths in a configuration mean what they mean to the driver.
        sys_path: The driver's import path: its folders that exist on this node are appended to the worker's,
            so the modules the driver's trials come from import here too.
        threads: torch's intra-op thread count on the worker.
    """

    def __init__(self, executor: bytes, index: int, cwd: str, sys_path: Sequence[str], threads: int) -> None:
        import torch

        if os.path.isdir(cwd):
            os.chdir(cwd)
        sys.path.extend(p for p in sys_path if p not in sys.path and os.path.isdir(p or "."))
        torch.set_num_threads(threads)
        self._spec = executor
        self._executor: Executor | None = None
        self._index = index
        self._verified: set[str] = set()

    def _build(self) -> Executor:
        if self._executor is None:
            from ray import cloudpickle

            try:
                spec = cloudpickle.loads(self._spec)
            except Exception as error:  # a module the driver imports that this node lacks, ...
                raise FMSError(
                    f"Ray worker {self._index} cannot load the epoch executor: {one_line(error, 200)}"
                ) from None
            self._executor = spec if is_executor(spec) else spec()
        return self._executor  # type: ignore[return-value]

    def _identity(self) -> dict[str, Any]:
        import ray

        node, gpus = ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]
        return {"ip": ray.util.get_node_ip_address(), "pid": os.getpid(), "node": node, "gpus": gpus}

    def ready(self) -> dict[str, Any]:
        """Build the executor (imports, trial builder); the worker's address, or the set-up error."""
        try:
            self._build()
        except FMSError as error:
            return {**self._identity(), "setup_error": one_line(error)}
        return self._identity()

    def _check_storage(self, job: EpochJob, token: str) -> None:
        root = job.log_dir.parent
        if str(root) in self._verified:
            return
        marker = root / STORAGE_MARKER
        where = f"Ray worker {self._index} on {self._identity()['ip']}"
        try:
            seen = marker.read_text().strip()
        except OSError:
            raise FMSError(
                f"{where} cannot see {root} (the study directory must be on storage shared by the driver and every "
                "node, see docs/ray.md)"
            ) from None
        if seen != token:
            raise FMSError(
                f"{where} sees another {root} than the driver (the study directory must be on storage shared by "
                "the driver and every node, see docs/ray.md)"
            )
        self._verified.add(str(root))

    def run(self, job: EpochJob, token: str, share: float | None = None) -> dict[str, Any]:
        """Train one epoch (``share``: of the GPU, GPU packing); a small dict: the outcome's fields and who ran it."""
        try:
            self._check_storage(job, token)
            with gpu_share(share):
                outcome = self._build().run_epoch(job)
        except FMSError as error:
            return {**self._identity(), "setup_error": one_line(error)}
        return {
            **self._identity(),
            "value": outcome.value,
            "metrics": dict(outcome.metrics),
            "error": outcome.error,
            "wall_s": outcome.wall_s,
            "weights": outcome.weights if job.record_weights else None,
        }
