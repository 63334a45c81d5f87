"""SimulatedExecutor: the virtual clock, utilisation arithmetic, determinism, and the checks a driver must pass."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from lightning_fms.errors import FMSError
from lightning_fms.parallel.profile import DriverProfile
from lightning_fms.parallel.protocol import is_concurrent
from lightning_fms.parallel.simulation import EpochTimes, SimulatedExecutor, ceiling_utilisation
from lightning_fms.parallel.synthetic import SyntheticCurves, TabulatedCurves
from lightning_fms.search.space import SearchSpace
from lightning_fms.testing.networks import tiny_mlp
from lightning_fms.training.executor import EpochJob

SPACE = SearchSpace.from_dict(
    {
        "hub": {"type": "hub"},
        "model.lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
        "data.batch_size": {"type": "categorical", "choices": [16, 32, 64]},
    },
    hub_entries=["a", "b"],
)


def config(lr: float = 0.01, hub: str = "a", batch_size: int = 32) -> dict:
    return {"hub": hub, "model.lr": lr, "data.batch_size": batch_size}


def job(folder, trial_id, epoch, cfg=None, resume=True, **fields) -> EpochJob:
    previous = folder / f"t{trial_id}-e{epoch - 1}.ckpt" if resume and epoch > 1 else None
    options = {"seed": 0, "monitor": "val_acc", "cap": 20, **fields}
    return EpochJob(
        trial_id, cfg or config(), epoch, previous, folder / f"t{trial_id}-e{epoch}.ckpt", folder, **options
    )


def fixed(workers: int, seconds: float = 10.0, **options) -> SimulatedExecutor:
    """Every epoch takes ``seconds``; the driver's own time is left off the clock unless told otherwise."""
    options.setdefault("count_driver_time", False)
    return SimulatedExecutor(workers, SyntheticCurves(SPACE), epoch_times=EpochTimes(seconds, 0.0), **options)


def test_it_is_a_concurrent_executor():
    assert is_concurrent(fixed(2))


def test_wait_jumps_the_clock_to_the_next_epoch_end_and_returns_all_that_ended(tmp_path):
    executor = SimulatedExecutor(
        3, SyntheticCurves(SPACE), epoch_times=EpochTimes(10.0, 0.5), seed=3, count_driver_time=False
    )
    executor.start()
    workers = [executor.submit(job(tmp_path, t, 1)) for t in range(3)]
    assert workers == ["sim-w0", "sim-w1", "sim-w2"]
    ends = sorted(EpochTimes(10.0, 0.5).seconds(3, t, 1) for t in range(3))
    first = executor.wait()
    assert len(first) == 1 and executor.clock == pytest.approx(ends[0])
    rest = executor.wait() + executor.wait()
    assert executor.clock == pytest.approx(ends[2]) and len(rest) == 2
    assert executor.wait() == []  # nothing running: no blocking
    for finished in first + rest:
        assert finished.lost is None and finished.outcome.error is None
        assert finished.outcome.wall_s == pytest.approx(EpochTimes(10.0, 0.5).seconds(3, finished.job.trial_id, 1))
        saved = torch.load(finished.job.checkpoint_out, weights_only=True)
        assert saved["simulated"]["trial"] == finished.job.trial_id
        assert finished.outcome.metrics == {"val_acc": finished.outcome.value}


def test_the_drivers_time_between_calls_goes_on_the_clock(tmp_path):
    executor = fixed(1, count_driver_time=True)
    executor.start()
    time.sleep(0.05)  # the driver deciding
    executor.submit(job(tmp_path, 0, 1))
    assert 0.05 <= executor.clock < 1.0  # the epoch starts after the decision
    executor.wait()
    assert executor.clock == pytest.approx(executor.intervals["sim-w0"][0][0] + 10.0)
    time.sleep(0.05)  # committing
    executor.close()
    stats = executor.stats()
    assert stats.makespan_s >= 10.1 and stats.driver_s >= 0.1 and stats.driver_calls == 3
    assert stats.busy_s == pytest.approx(10.0)


def test_a_driver_slower_than_the_epochs_finds_them_all_ended(tmp_path):
    executor = fixed(2, seconds=0.01, count_driver_time=True)
    executor.start()
    executor.submit(job(tmp_path, 0, 1))
    executor.submit(job(tmp_path, 1, 1))
    time.sleep(0.05)
    assert len(executor.wait()) == 2  # both ended while the driver was busy: the workers sat idle


def test_utilisation_is_busy_worker_seconds_over_workers_times_makespan(tmp_path):
    executor = fixed(4)
    executor.start()
    executor.submit(job(tmp_path, 0, 1))
    executor.submit(job(tmp_path, 1, 1))
    executor.wait()  # t = 10: both end
    executor.submit(job(tmp_path, 0, 2))
    executor.wait()  # t = 20
    executor.close()
    stats = executor.stats()
    assert stats.makespan_s == pytest.approx(20.0) and stats.busy_s == pytest.approx(30.0)
    assert stats.utilisation == pytest.approx(30.0 / (4 * 20.0))
    assert stats.epochs == 3 and stats.submitted == 3 and stats.decisions_per_s == pytest.approx(3 / 20.0)
    assert executor.intervals["sim-w0"] == [(0.0, 10.0), (10.0, 20.0)]
    assert executor.intervals["sim-w1"] == [(0.0, 10.0)] and executor.intervals["sim-w2"] == []


def test_close_counts_abandoned_epochs_busy_up_to_the_close(tmp_path):
    executor = fixed(2)
    executor.start()
    executor.submit(job(tmp_path, 0, 1))
    executor.wait(timeout=4.0)
    assert executor.clock == pytest.approx(4.0)
    executor.close()
    executor.close()
    assert executor.stats().busy_s == pytest.approx(4.0) and executor.stats().epochs == 0
    with pytest.raises(FMSError, match="start"):
        executor.submit(job(tmp_path, 1, 1))


def test_wait_with_a_timeout_moves_the_clock_at_most_that_far(tmp_path):
    executor = fixed(1)
    executor.start()
    executor.submit(job(tmp_path, 0, 1))
    assert executor.wait(timeout=3.0) == [] and executor.clock == pytest.approx(3.0)
    assert len(executor.wait(timeout=30.0)) == 1 and executor.clock == pytest.approx(10.0)


def run_all(executor: SimulatedExecutor, folder, jobs: int) -> list[tuple]:
    executor.start()
    seen = []
    for t in range(jobs):
        executor.submit(job(folder, t, 1, config(lr=0.001 * (t + 1))))
    while finished := executor.wait():
        for f in finished:
            value, wall_s = (f.outcome.value, f.outcome.wall_s) if f.outcome is not None else (None, None)
            seen.append((f.job.trial_id, f.worker, value, wall_s, f.lost))
    return seen


def test_runs_are_deterministic_given_the_seed(tmp_path):
    def make(seed):
        return SimulatedExecutor(
            4, SyntheticCurves(SPACE, seed=1), seed=seed, loss_probability=0.3, count_driver_time=False
        )

    first = run_all(make(5), tmp_path / "a", 4)
    assert first == run_all(make(5), tmp_path / "b", 4)
    assert first != run_all(make(6), tmp_path / "c", 4)


def test_epoch_times_have_the_median_and_spread_asked_for():
    times = EpochTimes(60.0, 0.3)
    draws = torch.tensor([times.seconds(0, t, 1) for t in range(2000)])
    assert draws.median().item() == pytest.approx(60.0, rel=0.05)
    assert draws.log().std().item() == pytest.approx(0.3, rel=0.1)
    assert times.seconds(0, 1, 1, fraction=0.5) == pytest.approx(times.seconds(0, 1, 1) / 2)
    with pytest.raises(FMSError, match="median_s"):
        EpochTimes(0.0)


def test_lost_epochs_come_back_lost_without_a_checkpoint_and_count_busy_until_the_loss(tmp_path):
    executor = fixed(8, loss_probability=0.5, seed=2)
    results = run_all(executor, tmp_path, 8)
    lost = [r for r in results if r[4] is not None]
    assert 0 < len(lost) < 8
    for trial_id, *_ in lost:
        assert not (tmp_path / f"t{trial_id}-e1.ckpt").exists()
    stats = executor.stats()
    assert stats.lost == len(lost) and stats.epochs == 8 - len(lost)
    assert (8 - len(lost)) * 10.0 < stats.busy_s < 8 * 10.0
    assert sorted(executor.trained) == sorted((r[0], 1) for r in results if r[4] is None)


def test_the_checks_a_driver_must_pass(tmp_path):
    executor = fixed(1, monitor="val_acc", cap=20)
    with pytest.raises(FMSError, match="start"):
        executor.submit(job(tmp_path, 0, 1))
    executor.start()
    with pytest.raises(FMSError, match="monitors 'val_loss'"):
        executor.submit(job(tmp_path, 0, 1, monitor="val_loss"))
    with pytest.raises(FMSError, match="cap is 5"):
        executor.submit(job(tmp_path, 0, 1, cap=5))
    with pytest.raises(FMSError, match="records weights"):
        executor.submit(job(tmp_path, 0, 1, record_weights=True))
    executor.submit(job(tmp_path, 0, 1))
    with pytest.raises(FMSError, match="busy"):
        executor.submit(job(tmp_path, 1, 1))
    executor.wait()
    with pytest.raises(FMSError, match="holds trial 0 epoch 1"):
        executor.submit(replace(job(tmp_path, 1, 2), resume_from=tmp_path / "t0-e1.ckpt"))
    with pytest.raises(FMSError, match="not a simulated checkpoint"):
        executor.submit(job(tmp_path, 5, 2))  # t5-e1.ckpt was never written


def test_two_epochs_of_one_trial_never_run_at_once(tmp_path):
    executor = fixed(2)
    executor.start()
    executor.submit(job(tmp_path, 0, 1))
    with pytest.raises(FMSError, match="already has an epoch running"):
        executor.submit(job(tmp_path, 0, 2, resume=False))


def test_duplicates_lists_a_trial_epoch_trained_twice(tmp_path):
    executor = fixed(1)
    executor.start()
    for _ in range(2):
        executor.submit(job(tmp_path, 0, 1))
        executor.wait()
    assert executor.duplicates == [(0, 1)]


def test_weights_start_from_the_hub_module_and_move_further_at_later_epochs(tmp_path):
    torch.manual_seed(0)
    modules = {"a": tiny_mlp(), "b": tiny_mlp()}
    executor = fixed(1, modules=lambda entry: modules[entry], hub_key="hub")
    executor.start()
    distances = []
    for epoch in (1, 2, 8):
        executor.submit(job(tmp_path, 0, epoch, resume=False, record_weights=True))
        (finished,) = executor.wait()
        weights = finished.outcome.weights
        reference = modules["a"].state_dict()
        assert weights.keys() == reference.keys()
        distances.append(sum((weights[k] - reference[k]).norm().item() for k in reference))
    assert 0 < distances[0] < distances[1] < distances[2]
    assert executor.pretrained_module("a") is modules["a"] and executor.pretrained_module(None) is None


def test_run_epoch_is_one_submit_and_wait(tmp_path):
    executor = fixed(2)
    outcome = executor.run_epoch(job(tmp_path, 0, 1))
    assert outcome.error is None and executor.clock == pytest.approx(10.0)
    assert outcome.value == SyntheticCurves(SPACE).value(config(), 1)


def test_synthetic_curves_are_deterministic_bounded_and_differ_between_configurations():
    curves = SyntheticCurves(SPACE, seed=0)
    configs = [SPACE.sample(np.random.default_rng(i)) for i in range(40)]
    table = [[curves.value(c, k) for k in range(1, 21)] for c in configs]
    assert table == [[SyntheticCurves(SPACE, seed=0).value(c, k) for k in range(1, 21)] for c in configs]
    assert all(0.0 <= v <= 1.0 for row in table for v in row)
    finals = [row[-1] for row in table]
    assert max(finals) - min(finals) > 0.1
    early = sorted(range(40), key=lambda i: table[i][1])
    late = sorted(range(40), key=lambda i: table[i][-1])
    assert early != late  # curves cross: the early ranking is not the final one
    assert SyntheticCurves(SPACE, seed=1).value(configs[0], 5) != table[0][4]


def test_tabulated_curves_look_values_up_and_refuse_unknown_configurations():
    configs = [config(0.01), config(0.1)]
    curves = TabulatedCurves(configs, [[0.1, 0.2], [0.3, 0.4]])
    assert curves.value(config(0.1), 2) == 0.4 and curves.epochs == 2
    with pytest.raises(FMSError, match="not in the table"):
        curves.value(config(0.2), 1)
    with pytest.raises(FMSError, match="beyond"):
        curves.value(config(0.1), 3)
    with pytest.raises(FMSError, match=r"\[N, E\]"):
        TabulatedCurves(configs, [0.1, 0.2])


def test_driver_profile_counts_each_calls_own_time():
    class Driver:
        def commit(self):
            time.sleep(0.02)
            self.save()

        def save(self):
            time.sleep(0.03)

    driver = Driver()
    profile = DriverProfile()
    profile.wrap(driver, "commit", "commit")
    profile.wrap(driver, "save", "save")
    driver.commit()
    driver.save()
    assert profile.calls == {"commit": 1, "save": 2}
    assert 0.02 <= profile.seconds["commit"] < 0.045  # its nested save (0.03 s) is not its own time
    assert profile.seconds["save"] >= 0.06
    assert profile.mean("save") == pytest.approx(profile.seconds["save"] / 2)
    assert profile.inclusive["commit"] == pytest.approx(profile.seconds["commit"] + profile.events[0][2])
    profile.unwrap()
    assert "commit" not in vars(driver)
    driver.commit()
    assert profile.calls["commit"] == 1
    assert math.isclose(profile.total, profile.seconds["commit"] + profile.seconds["save"])


def test_the_ceiling_is_the_share_a_driver_that_takes_no_time_reaches(tmp_path):
    assert ceiling_utilisation(4, [10.0] * 8) == pytest.approx(1.0)
    assert ceiling_utilisation(4, [10.0] * 5) == pytest.approx(5 / 8)
    assert ceiling_utilisation(2, [10.0, 30.0, 10.0]) == pytest.approx(50 / 60)
    executor = fixed(4, count_driver_time=True)
    executor.start()
    for t in range(4):
        time.sleep(0.02)  # a slow driver: each epoch starts later than it could
        executor.submit(job(tmp_path, t, 1))
    executor.wait()
    executor.submit(job(tmp_path, 4, 1))
    while executor.wait():
        pass
    executor.close()
    assert executor.ceiling() == pytest.approx(5 / 8)  # the same five epochs handed out by a driver taking no time
    assert executor.stats().utilisation < executor.ceiling()


def test_driver_profile_counts_calls_from_other_threads_apart():
    class Fitter:
        def fit(self):
            time.sleep(0.02)

    fitter = Fitter()
    profile = DriverProfile()
    profile.wrap(fitter, "fit", "fit")
    thread = threading.Thread(target=fitter.fit)
    thread.start()
    thread.join()
    fitter.fit()
    assert profile.calls["fit"] == 1 and profile.background_calls["fit"] == 1
    assert profile.background["fit"] >= 0.02 and profile.total == profile.seconds["fit"]


def test_a_wait_passes_in_real_time_while_another_thread_works(tmp_path):
    executor = fixed(1, seconds=10.0)
    executor.start()
    executor.submit(job(tmp_path, 0, 1))
    stop = time.perf_counter() + 0.3

    def busy():  # a background fit
        while time.perf_counter() < stop:
            sum(range(1000))

    thread = threading.Thread(target=busy)
    thread.start()
    assert executor.wait(timeout=5.0) == []
    thread.join()
    assert 0.15 < executor.followed_s < 1.0  # the clock followed the thread, then jumped
    assert executor.clock == pytest.approx(5.0)
    started = time.perf_counter()
    assert len(executor.wait()) == 1 and time.perf_counter() - started < 0.1  # nobody works: it jumps
    assert executor.followed_s < 1.0


def test_the_drivers_mode_and_refit_policy_are_read_from_the_executor():
    executor = fixed(2, mode="sync", refit="inline")
    assert (executor.mode, executor.refit) == ("sync", "inline")


def test_driver_profile_counts_only_the_calls_asked_for_but_times_them_all():
    class Optimizer:
        def claim(self, found):
            time.sleep(0.01)
            return "suggestion" if found else None

    optimizer = Optimizer()
    profile = DriverProfile()
    profile.wrap(optimizer, "claim", "decide", count=lambda result: result is not None)
    optimizer.claim(True)
    optimizer.claim(False)
    assert profile.calls["decide"] == 1 and len(profile.events) == 1 and profile.seconds["decide"] >= 0.02
