"""A concurrent executor for tests: runs submitted epochs one at a time, in an order and with losses you choose.

:class:`SequencedExecutor` wraps any :class:`~lightning_fms.training.executor.Executor` (e.g. the in-process one)
and offers the :class:`~lightning_fms.parallel.protocol.ConcurrentExecutor` methods. Nothing runs in parallel, so
a test is deterministic, yet the driver sees several epochs in flight: each :meth:`SequencedExecutor.wait` ends
the submitted epochs the ``order`` picks (the oldest, the newest, or a seeded random one; ``"all"`` ends the whole
batch), and the epochs listed in ``lose`` come back as lost (untrained) the first times they run, as when a worker
dies mid-epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from lightning_fms.parallel.protocol import Finished
from lightning_fms.training.executor import EpochJob, EpochOutcome, Executor

__all__ = ["SequencedExecutor"]

ORDERS = ("oldest", "newest", "random", "all")


class SequencedExecutor:
    """Offers ``workers`` slots over ``inner``; runs the submitted epochs when :meth:`wait` is called.

    Args:
        inner: Trains each epoch (its ``run_epoch``).
        workers: Slots the driver fills.
        order: Which submitted epochs a :meth:`wait` ends: ``"oldest"``, ``"newest"``, ``"random"`` (seeded by
            ``seed``) or ``"all"``.
        lose: ``(trial_id, epoch) -> n``: the first ``n`` attempts at that epoch come back lost.
        seed: Seeds ``"random"``.
        mode: The driver's decision mode (``"async"`` or ``"sync"``), read by the driver.
        refit: The driver's refit policy, read by the driver.
    """

    def __init__(
        self,
        inner: Executor,
        workers: int = 2,
        order: str = "oldest",
        lose: Mapping[tuple[int, int], int] | None = None,
        seed: int = 0,
        mode: str = "async",
        refit: str = "inline",
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.inner = inner
        self._workers = int(workers)
        self.order = order
        self.lose = dict(lose or {})
        self.rng = np.random.default_rng(seed)
        self.mode = mode
        self.refit = refit
        self.submitted: list[tuple[EpochJob, str]] = []
        self.history: list[EpochJob] = []
        """Every job that ran, in the order it ran (lost ones included)."""
        self.most_in_flight = 0
        self.started = 0
        self.closed = 0
        self._free = list(range(self._workers))

    @property
    def workers(self) -> int:
        """Slots the driver fills."""
        return self._workers

    def start(self) -> None:
        """Nothing to start (counted)."""
        self.started += 1

    def close(self) -> None:
        """Nothing to stop (counted)."""
        self.closed += 1

    def submit(self, job: EpochJob) -> str:
        """Queue ``job`` on a free slot; returns the slot's label (``"w<i>"``)."""
        if not self._free:
            raise RuntimeError("submit() with every worker busy")
        worker = f"w{self._free.pop(0)}"
        self.submitted.append((job, worker))
        self.most_in_flight = max(self.most_in_flight, len(self.submitted))
        return worker

    def wait(self, timeout: float | None = None) -> list[Finished]:
        """End the submitted epochs ``order`` picks (run them now, or lose them); ``[]`` when none is submitted."""
        if not self.submitted:
            return []
        if self.order == "all":
            picks = list(range(len(self.submitted)))
        elif self.order == "oldest":
            picks = [0]
        elif self.order == "newest":
            picks = [len(self.submitted) - 1]
        else:
            picks = [int(self.rng.integers(len(self.submitted)))]
        ended = [self.submitted[i] for i in picks]
        self.submitted = [s for i, s in enumerate(self.submitted) if i not in picks]
        out = []
        for job, worker in ended:
            self._free.append(int(worker[1:]))
            self._free.sort()
            self.history.append(job)
            key = (job.trial_id, job.epoch)
            if self.lose.get(key, 0) > 0:
                self.lose[key] -= 1
                out.append(Finished(job, worker, lost=f"worker {worker} was killed"))
                continue
            outcome: EpochOutcome = self.inner.run_epoch(job)
            out.append(Finished(job, worker, outcome=outcome))
        return out

    def run_epoch(self, job: EpochJob) -> EpochOutcome:
        """Train one epoch now (the one-epoch executor method)."""
        return self.inner.run_epoch(job)

    def pretrained_module(self, entry: str | None) -> nn.Module | None:
        """As ``inner``'s."""
        return self.inner.pretrained_module(entry)

    def frozen_layer_costs(
        self, configs: Sequence[dict[str, Any]], fractions: tuple[float, ...]
    ) -> list[tuple[float, ...]]:
        """As ``inner``'s."""
        return self.inner.frozen_layer_costs(configs, fractions)
