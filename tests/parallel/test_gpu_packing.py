"""GPU packing without Ray: shares from the memory estimate, rounding, doubling after out of memory, the queue."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lightning_fms.errors import FMSError, failure_message
from lightning_fms.parallel.gpu_packing import (
    GpuPacker,
    GpuShares,
    is_out_of_memory,
    next_share,
    round_share,
    seat_gpus,
)
from lightning_fms.search.space import SearchSpace
from lightning_fms.training.executor import EpochJob
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.zoo import DigitsDataModule, ImageClassifier

OOM = failure_message(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))


def job(trial_id: int, fraction: float | None = None, config: dict | None = None) -> EpochJob:
    folder = Path("/nonexistent") / str(trial_id)
    return EpochJob(
        trial_id=trial_id,
        config=dict(config or {"hub": "cnn-xs"}),
        epoch=1,
        resume_from=None,
        checkpoint_out=folder / "epoch-1.ckpt",
        log_dir=folder,
        seed=0,
        monitor="val_acc",
        cap=3,
        trainable_fraction=fraction,
    )


@dataclass
class FakeSeat:
    label: str
    gpu: tuple[str, str] | None
    busy: bool = False
    restarting: bool = False


def test_rounding_doubling_and_seats():
    assert [round_share(s) for s in (0.01, 0.3, 0.5, 0.75, 1.7)] == [0.0625, 0.3125, 0.5, 0.75, 1.0]
    assert [next_share(s) for s in (0.0625, 0.3125, 0.75, 1.0)] == [0.125, 0.625, 1.0, None]
    assert [seat_gpus(w, 2) for w in (1, 2, 3, 4, 5)] == [1.0, 1.0, 0.5, 0.5, 0.3333]
    with pytest.raises(FMSError, match="at least one GPU, it has 0.5"):
        seat_gpus(2, 0.5)
    with pytest.raises(FMSError, match="0 < ray.gpus_per_trial <= 1"):
        GpuShares(1.5)


def test_out_of_memory_is_told_from_other_errors():
    assert is_out_of_memory(OOM) and OOM.startswith("OutOfMemoryError: CUDA out of memory")
    assert is_out_of_memory(failure_message(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")))
    assert not is_out_of_memory(failure_message(RuntimeError("size mismatch")))
    assert not is_out_of_memory(None)


def test_a_frozen_epochs_share_follows_its_memory_estimate(hub):
    space = SearchSpace.from_dict({"hub": {"type": "hub"}}, hub_entries=hub.names)
    executor = InProcessExecutor.from_factories(
        ImageClassifier, DigitsDataModule, space, hub, datamodule_options={"task": "target", "batch_size": 64}
    )
    calls = []

    def estimator(configs, fractions):
        calls.append(fractions)
        return executor.memory_estimates(configs, fractions)

    shares = GpuShares(0.75, estimator)
    ((low, full),) = executor.memory_estimates([{"hub": "cnn-xs"}], (0.25, 1.0))
    assert shares.share(job(1)) == shares.share(job(1, 1.0)) == 0.75 and not calls  # full training: as declared
    assert shares.share(job(1, 0.25)) == round_share(0.75 * low.total / full.total) == 0.375
    assert shares.share(job(2, 0.25)) == 0.375 and len(calls) == 1  # one estimate per configuration and fraction
    assert GpuShares(0.75).share(job(1, 0.25)) == 0.75  # without an estimate every epoch gets the declared share


def test_the_queue_packs_by_share_and_never_gives_out_more_than_a_gpu():
    shares = {1: 0.75, 2: 0.75, 3: 0.25, 4: 0.5, 5: 0.25}

    class Fixed(GpuShares):
        def share(self, job):
            return shares[job.trial_id]

    packer = GpuPacker(Fixed(0.75))
    seats = [FakeSeat(f"w{i}", ("n", str(i % 2))) for i in range(4)]  # two seats on each of two GPUs
    started = []

    def start(seat, job, share):
        seat.busy = True
        started.append((job.trial_id, seat.gpu[1], share))
        return job.trial_id

    for trial_id in shares:
        packer.add(job(trial_id))
    packer.dispatch(seats, start)
    # the fullest GPU with room first; trial 4 (0.5) fits nowhere yet and holds back trial 5 (which would fit)
    assert started == [(1, "0", 0.75), (2, "1", 0.75), (3, "0", 0.25)]
    assert [q.job.trial_id for q in packer.queue] == [4, 5]
    assert max(packer.ledger.used.values()) <= 1.0
    done = packer.release(2, {"value": 0.5, "error": None})
    assert done == {"value": 0.5, "error": None}
    next(s for s in seats if s.gpu[1] == "1").busy = False
    packer.dispatch(seats, start)
    assert started[3:] == [(4, "1", 0.5), (5, "1", 0.25)] and packer.queue == []
    assert packer.ledger.used == {("n", "0"): 1.0, ("n", "1"): 0.75}
    assert all(used <= 1.0 for used in packer.ledger.used.values())


def test_out_of_memory_goes_back_to_the_head_of_the_queue_with_twice_the_share():
    packer = GpuPacker(GpuShares(0.25))
    seats = [FakeSeat("w1", ("n", "0"))]

    def start(seat, job, share):
        seat.busy = True
        return (job.trial_id, share)

    packer.add(job(1))
    packer.add(job(2))
    for share in (0.25, 0.5, 1.0):
        packer.dispatch(seats, start)
        assert packer.where(packer.queue[0]) is None  # trial 2 waits behind the retried one
        seats[0].busy = False
        result = packer.release((1, share), {"value": float("nan"), "error": OOM})
        if share < 1.0:
            assert result is None and packer.queue[0].share == 2 * share and packer.queue[0].job.trial_id == 1
    assert result["error"] == f"CUDA out of memory with a whole GPU (GPU shares tried: 0.25, 0.5, 1): {OOM}"
    assert [(p.share, p.out_of_memory) for p in packer.placements] == [(0.25, True), (0.5, True), (1.0, True)]
    assert packer.ledger.used == {} and [q.job.trial_id for q in packer.queue] == [2]
