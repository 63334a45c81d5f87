"""GPU packing: each epoch's share of a GPU, and which GPU has room for it.

Ray's fractional GPUs are logical (Ray limits how many holders a GPU has, not their memory) and an actor keeps the
resources it was made with. So with ``0 < gpus_per_trial <= 1`` the Ray executor makes its long-lived workers
*seats*: each holds ``1 / ceil(workers / GPUs)`` of a GPU in Ray's books (:func:`seat_gpus`), which pins it to one
GPU and caps how many workers share a GPU, and the executor hands out the GPU's memory, epoch by epoch, in
*shares*:

* an epoch at full training gets ``gpus_per_trial``; with the frozen-layer fidelity an epoch at trainable fraction
  ``f`` gets ``gpus_per_trial`` times the ratio of its memory estimate at ``f`` to the one at full training
  (:mod:`lightning_fms.frozen.memory`), so low-fidelity epochs pack more trials per GPU (:class:`GpuShares`);
* shares are rounded up to multiples of :data:`SHARE_GRID`;
* an epoch starts on a free seat whose GPU has room for its share (:class:`GpuLedger`; the fullest GPU that has
  room, so large holes stay free for large epochs), else it waits in the executor's queue; the running shares of a
  GPU never add up to more than 1;
* on a CUDA device the worker caps its process at the share (``torch.cuda.set_per_process_memory_fraction``) and
  empties torch's cache after the epoch;
* an epoch that runs out of GPU memory (:func:`is_out_of_memory`) is queued again at twice its share
  (:func:`next_share`, at most one GPU) instead of being recorded as a failed trial; out of memory with a whole GPU
  is a failed trial, with a line naming the shares tried (:func:`out_of_memory_line`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lightning_fms.errors import FMSError
from lightning_fms.frozen.memory import MemoryEstimate
from lightning_fms.parallel.protocol import Finished
from lightning_fms.training.executor import EpochJob, EpochOutcome

__all__ = [
    "OUT_OF_MEMORY_MARKERS",
    "SHARE_GRID",
    "GpuLedger",
    "GpuPacker",
    "GpuSeats",
    "GpuShares",
    "Placement",
    "gpu_share",
    "is_out_of_memory",
    "next_share",
    "out_of_memory_line",
    "round_share",
    "seat_gpus",
]

SHARE_GRID = 1 / 16
"""Epoch shares are multiples of this (one GPU holds at most 16 epochs at once)."""
OUT_OF_MEMORY_MARKERS = ("OutOfMemoryError", "CUDA out of memory")
"""An epoch's error that contains one of these ran out of GPU memory (``torch.cuda.OutOfMemoryError``'s name and
the text of the ``RuntimeError`` older PyTorch raised)."""
_EPS = 1e-9

Estimator = Callable[[Sequence[dict[str, Any]], tuple[float, ...]], Sequence[Sequence[MemoryEstimate]]]
"""``(configs, fractions) -> one estimate per fraction per configuration`` (an epoch executor's
``memory_estimates``)."""


def is_out_of_memory(error: str | None) -> bool:
    """Whether an epoch's error says that it ran out of GPU memory."""
    return error is not None and any(marker in error for marker in OUT_OF_MEMORY_MARKERS)


def round_share(share: float) -> float:
    """``share`` rounded up to a multiple of :data:`SHARE_GRID`, within ``[SHARE_GRID, 1]``."""
    steps = math.ceil(share / SHARE_GRID - _EPS)
    return min(1.0, max(1, steps) * SHARE_GRID)


def next_share(share: float) -> float | None:
    """The share an epoch that ran out of memory at ``share`` gets next: twice it, at most 1 (``None``: at 1)."""
    if share >= 1.0 - _EPS:
        return None
    return round_share(min(1.0, 2.0 * share))


def out_of_memory_line(tried: Sequence[float], error: str) -> str:
    """The failed trial's line after an out-of-memory at a whole GPU."""
    shares = ", ".join(f"{s:g}" for s in tried)
    return f"CUDA out of memory with a whole GPU (GPU shares tried: {shares}): {error}"


def seat_gpus(workers: int, gpus: float) -> float:
    """The Ray GPUs each of ``workers`` seats holds on a cluster with ``gpus`` GPUs: ``1 / ceil(workers / gpus)``.

    Raises:
        FMSError: the cluster has no GPU.
    """
    whole = math.floor(gpus + _EPS)
    if whole < 1:
        raise FMSError(f"GPU packing needs a Ray cluster with at least one GPU, it has {gpus:g}")
    per_gpu = math.ceil(workers / whole)
    return math.floor(10_000 / per_gpu) / 10_000  # Ray keeps four decimals of a resource


class GpuShares:
    """The GPU share of each epoch (see the module docstring).

    Args:
        gpus_per_trial: The share of an epoch at full training, in ``(0, 1]``.
        estimator: The epoch executor's ``memory_estimates``; ``None``: every epoch gets ``gpus_per_trial``.

    Raises:
        FMSError: ``gpus_per_trial`` is not in ``(0, 1]``.
    """

    def __init__(self, gpus_per_trial: float, estimator: Estimator | None = None) -> None:
        if not 0.0 < gpus_per_trial <= 1.0:
            raise FMSError(f"GPU packing needs 0 < ray.gpus_per_trial <= 1, got {gpus_per_trial!r}")
        self.gpus_per_trial = float(gpus_per_trial)
        self.estimator = estimator
        self._ratios: dict[tuple[str, float], float] = {}

    def ratio(self, config: Mapping[str, Any], fraction: float) -> float:
        """The memory estimate at ``fraction`` over the one at full training (cached per configuration)."""
        key = (json.dumps(dict(config), sort_keys=True, default=str), round(float(fraction), 6))
        if key not in self._ratios:
            assert self.estimator is not None
            ((low, full),) = self.estimator([dict(config)], (float(fraction), 1.0))
            self._ratios[key] = min(1.0, low.total / full.total) if full.total > 0 else 1.0
        return self._ratios[key]

    def share(self, job: EpochJob) -> float:
        """The share of GPU ``job`` starts with."""
        fraction = job.trainable_fraction
        if self.estimator is None or fraction is None or fraction >= 1.0 - _EPS:
            return round_share(self.gpus_per_trial)
        return round_share(self.gpus_per_trial * self.ratio(job.config, fraction))


@dataclass
class Placement:
    """An epoch's stay on a GPU (for the executor's record and for the tests).

    Attributes:
        trial_id: The trial.
        epoch: The epoch.
        share: The share of the GPU it held.
        gpu: ``(node id, GPU id)``.
        worker: The seat's label.
        started: When it was sent to the seat (``time.time()``).
        ended: When its result came back (``None``: still running).
        out_of_memory: Whether it ran out of GPU memory.
    """

    trial_id: int
    epoch: int
    share: float
    gpu: tuple[str, str]
    worker: str
    started: float
    ended: float | None = None
    out_of_memory: bool = False


@dataclass
class GpuLedger:
    """How much of each GPU the running epochs hold.

    Attributes:
        used: ``(node id, GPU id)`` -> the sum of the running epochs' shares.
    """

    used: dict[tuple[str, str], float] = field(default_factory=dict)

    def room(self, gpu: tuple[str, str]) -> float:
        """The share of ``gpu`` no running epoch holds."""
        return 1.0 - self.used.get(gpu, 0.0)

    def best_fit(self, gpus: Sequence[tuple[str, str]], share: float) -> tuple[str, str] | None:
        """Of ``gpus``, the one with the least room that still holds ``share`` (``None``: none does)."""
        fits = [g for g in gpus if self.room(g) >= share - _EPS]
        return min(fits, key=self.room, default=None)

    def take(self, gpu: tuple[str, str], share: float) -> None:
        """Hold ``share`` of ``gpu``.

        Raises:
            FMSError: ``gpu`` has no room for it (a bug in the caller).
        """
        if self.room(gpu) < share - _EPS:
            raise FMSError(f"GPU {gpu[1]} of node {gpu[0][:8]} has {self.room(gpu):g} free, not {share:g}")
        self.used[gpu] = self.used.get(gpu, 0.0) + share

    def give(self, gpu: tuple[str, str], share: float) -> None:
        """Free ``share`` of ``gpu``."""
        left = self.used.get(gpu, 0.0) - share
        if left <= _EPS:
            self.used.pop(gpu, None)
        else:
            self.used[gpu] = left


@contextlib.contextmanager
def gpu_share(share: float | None) -> Iterator[None]:
    """On a CUDA device, cap this process at ``share`` of the GPU's memory, and empty torch's cache afterwards.

    ``None``, or no CUDA device (Ray's logical GPUs on a CPU machine): nothing is capped.
    """
    import torch

    cuda = share is not None and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(share)))  # type: ignore[arg-type]
    try:
        yield
    finally:
        if cuda:
            import gc

            gc.collect()
            torch.cuda.empty_cache()


class Seat(Protocol):
    """A worker as the packer sees it."""

    busy: bool
    restarting: bool
    gpu: tuple[str, str] | None
    label: str


@dataclass
class _Queued:
    """An epoch waiting for a GPU with room for its share."""

    job: EpochJob
    share: float
    tried: list[float]


class GpuPacker:
    """The epochs waiting for room on a GPU and the shares the running ones hold (no Ray in here).

    Args:
        shares: Each epoch's first share.
    """

    def __init__(self, shares: GpuShares) -> None:
        self.shares = shares
        self.ledger = GpuLedger()
        self.queue: list[_Queued] = []
        self.placements: list[Placement] = []
        """Every epoch's stay on a GPU, in the order they started."""
        self._held: dict[Any, tuple[_Queued, Placement]] = {}

    def add(self, job: EpochJob) -> _Queued:
        """Queue ``job`` at its first share."""
        item = _Queued(job, self.shares.share(job), [])
        self.queue.append(item)
        return item

    def where(self, item: _Queued) -> str | None:
        """The worker ``item`` was started on (``None``: still queued)."""
        return next((p.worker for q, p in self._held.values() if q is item), None)

    def dispatch(self, seats: Sequence[Seat], start: Callable[[Any, EpochJob, float], Any]) -> None:
        """Start queued epochs, first come first, each on a free seat whose GPU has room for its share.

        An epoch that does not fit yet holds back those behind it, so that small epochs never starve a large one.

        Args:
            seats: The workers.
            start: ``start(seat, job, share) -> handle`` sends the epoch (the handle comes back to :meth:`release`).
        """
        while self.queue:
            item = self.queue[0]
            free = [s for s in seats if not s.busy and not s.restarting and s.gpu is not None]
            gpu = self.ledger.best_fit(sorted({s.gpu for s in free}), item.share)  # type: ignore[misc]
            if gpu is None:
                return
            seat = next(s for s in free if s.gpu == gpu)
            self.queue.pop(0)
            handle = start(seat, item.job, item.share)
            self.ledger.take(gpu, item.share)
            placement = Placement(item.job.trial_id, item.job.epoch, item.share, gpu, seat.label, time.time())
            self.placements.append(placement)
            self._held[handle] = (item, placement)

    def release(self, handle: Any, result: dict[str, Any] | str) -> dict[str, Any] | str | None:
        """Give back the share an ended epoch held; ``None`` when it ran out of memory and is queued again.

        Args:
            handle: What ``start`` returned for it.
            result: The worker's result (a dict with the outcome's fields), or why the worker was lost.

        Returns:
            ``result``; after an out-of-memory at a whole GPU, with the error replaced by
            :func:`out_of_memory_line`.
        """
        item, placement = self._held.pop(handle)
        self.ledger.give(placement.gpu, item.share)
        placement.ended = time.time()
        if isinstance(result, str) or "setup_error" in result or not is_out_of_memory(result.get("error")):
            return result
        placement.out_of_memory = True
        tried = [*item.tried, item.share]
        larger = next_share(item.share)
        if larger is None:
            return {**result, "error": out_of_memory_line(tried, str(result["error"]))}
        self.queue.insert(0, _Queued(item.job, larger, tried))
        return None

    def clear(self) -> None:
        """Forget the queue and the running epochs (the executor closed); the placements stay."""
        self.queue, self._held, self.ledger = [], {}, GpuLedger()


class GpuSeats:
    """GPU packing on a :class:`~lightning_fms.parallel.ray_executor.RayExecutor`'s workers (its seats).

    The executor hands :meth:`submit`, :meth:`wait` and :meth:`run_epoch` over to this when ``0 < gpus_per_trial
    <= 1``; the epochs go to its workers' ``run`` with their share.

    Args:
        executor: The :class:`~lightning_fms.parallel.ray_executor.RayExecutor` (started; this reads its workers,
            its Ray handle and its epochs in flight).
        estimator: The memory estimate of its epochs (the driver's epoch executor's ``memory_estimates``).
    """

    def __init__(self, executor: Any, estimator: Estimator | None) -> None:
        self.executor = executor
        self.packer = GpuPacker(GpuShares(executor.gpus_per_trial, estimator))

    def _start(self, slot: Any, job: EpochJob, share: float) -> Any:
        executor = self.executor
        executor._mark_storage(job)
        ref = slot.actor.run.remote(job, executor._token, share)
        slot.busy = True
        executor._running[ref] = (job, slot)
        return ref

    def dispatch(self) -> None:
        """Start what fits, after asking lost workers whether they are back."""
        self._probe_restarting()
        self.packer.dispatch(self.executor._slots, self._start)

    def _probe_restarting(self) -> None:
        """Ask lost workers, without blocking, whether they are back (a restarted one may sit on another GPU)."""
        executor = self.executor
        ray = executor._ray
        for slot in executor._slots:
            if not slot.restarting or slot.busy:
                continue
            if slot.probe is None:
                slot.probe = slot.actor.ready.remote()
                continue
            if not ray.wait([slot.probe], timeout=0)[0]:
                continue
            probe, slot.probe = slot.probe, None
            try:
                info = ray.get(probe)
            except executor._lost_errors():
                continue
            executor._note(slot, info)
            slot.restarting = False

    def submit(self, job: EpochJob) -> str:
        """Queue ``job`` at its share and start what fits; the worker's label, or ``"queued"``.

        Raises:
            FMSError: ``workers`` epochs are running or queued already.
        """
        executor = self.executor
        if len(executor._running) + len(self.packer.queue) >= executor.workers:
            raise FMSError(f"all {executor.workers} Ray workers are busy (wait for an epoch to end before submitting)")
        item = self.packer.add(job)
        self.dispatch()
        return self.packer.where(item) or "queued"

    def wait(self, timeout: float | None) -> list[Finished]:
        """The executor's ``wait``; epochs queued again after running out of memory are not returned.

        Raises:
            FMSError: a set-up problem on a worker, or epochs queued while no worker came back within the
                executor's ``start_timeout``.
        """
        executor = self.executor
        deadline = None if timeout is None else time.monotonic() + timeout
        stalled_since = time.monotonic()
        while True:
            self.dispatch()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if executor._running:
                finished = executor._wait_ended(1.0 if left is None else min(1.0, left))
                if finished:
                    return finished
                stalled_since = time.monotonic()
            elif not self.packer.queue:
                return []
            elif time.monotonic() - stalled_since > executor.start_timeout:
                raise FMSError(f"no Ray worker could take a queued epoch within {executor.start_timeout:g} s")
            else:
                time.sleep(0.2)
            if deadline is not None and time.monotonic() >= deadline:
                return []

    def run_epoch(self, job: EpochJob, retries: int) -> EpochOutcome:
        """The executor's ``run_epoch``: submit, wait, and again on a restarted worker up to ``retries`` times.

        Raises:
            FMSError: a set-up problem, or the worker lost ``1 + retries`` times.
        """
        reasons = []
        for _ in range(1 + retries):
            self.submit(job)
            finished: list[Finished] = []
            while not finished:
                finished = self.wait(None)
            (ended,) = finished
            if ended.outcome is not None:
                return ended.outcome
            reasons.append(str(ended.lost))
        raise FMSError(f"epoch {job.epoch} of trial {job.trial_id}: {reasons[-1]} ({len(reasons)} times)")
