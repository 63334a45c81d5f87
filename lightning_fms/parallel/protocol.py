"""The concurrent-executor contract: an executor that runs several epochs at once.

It extends the one-epoch :class:`~lightning_fms.training.executor.Executor` (whose ``run_epoch`` still trains
one epoch in the caller's process) with a non-blocking pair, :meth:`ConcurrentExecutor.submit` and
:meth:`ConcurrentExecutor.wait`. The tuner's driver (:mod:`lightning_fms.parallel.driver`) claims one epoch per
free worker, submits it, and commits each epoch as it ends; the study directory stays the one source of truth,
so an executor returns small results (value, metrics, weights when asked) and writes the checkpoint to the
job's ``checkpoint_out`` (shared storage) itself.

A worker that dies mid-epoch is not a failed trial: its epoch comes back from :meth:`ConcurrentExecutor.wait`
with :attr:`Finished.lost` set, and the driver gives the epoch back to the study (it is trained again later).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from lightning_fms.training.executor import EpochJob, EpochOutcome, Executor

__all__ = ["ConcurrentExecutor", "Finished", "is_concurrent"]


@dataclass(frozen=True)
class Finished:
    """An epoch that left a worker: trained (``outcome``), or lost with its worker (``lost``).

    Attributes:
        job: The job as submitted.
        worker: The worker that ran it (a short label, e.g. ``"ray-w1@127.0.0.1"``), for the trajectory.
        outcome: What the epoch produced (``error`` set: the trial failed); ``None`` when the worker was lost.
        lost: Why the worker was lost before the epoch ended, one line (``None``: it was not); the driver gives
            the epoch back, untrained and uncharged.
    """

    job: EpochJob
    worker: str
    outcome: EpochOutcome | None = None
    lost: str | None = None


@runtime_checkable
class ConcurrentExecutor(Executor, Protocol):
    """An :class:`~lightning_fms.training.executor.Executor` that also runs several epochs at once.

    Error contract: as :class:`~lightning_fms.training.executor.Executor`; a set-up problem found on a worker
    is raised (as :class:`~lightning_fms.errors.FMSError`) by the :meth:`wait` that collects it.
    """

    @property
    def workers(self) -> int:
        """How many epochs may run at once (the driver keeps this many submitted)."""
        ...

    def start(self) -> None:
        """Connect (start a local cluster, warm the workers); called by the driver before the first submit."""
        ...

    def submit(self, job: EpochJob) -> str:
        """Start ``job`` on a free worker without waiting for it; returns the worker's label."""
        ...

    def wait(self, timeout: float | None = None) -> list[Finished]:
        """Block until at least one submitted epoch has ended (or ``timeout`` seconds passed); all that ended."""
        ...

    def close(self) -> None:
        """Stop what :meth:`start` started (idempotent); submitted epochs still running are abandoned."""
        ...


def is_concurrent(executor: object) -> bool:
    """Whether ``executor`` runs epochs concurrently (has the :class:`ConcurrentExecutor` methods)."""
    return all(callable(getattr(executor, name, None)) for name in ("submit", "wait", "start", "close")) and hasattr(
        executor, "workers"
    )
