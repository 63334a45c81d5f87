"""The driver keeps several epochs in flight: budget exact, no epoch twice, lost workers, killed drivers, modes."""

from __future__ import annotations

import torch

from lightning_fms.search.trial import TrialStatus
from lightning_fms.study.directory import StudyDirectory
from lightning_fms.testing.concurrent import SequencedExecutor
from lightning_fms.testing.small_study import decisions, study_space, tuner_for
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.zoo import DigitsDataModule, ImageClassifier


def _inner(hub):
    return InProcessExecutor.from_factories(
        ImageClassifier,
        DigitsDataModule,
        study_space(),
        hub,
        monitor="val_acc",
        cap=3,
        datamodule_options={"task": "target", "batch_size": 128},
        trainer_options={"accelerator": "cpu"},
    )


def _trained(tuner):
    return [(d["trial"], d["epoch"]) for d in tuner.optimizer.decisions]


def test_two_workers_spend_the_budget_exactly_and_never_train_an_epoch_twice(hub, tmp_path, fast_surrogate):
    executor = SequencedExecutor(_inner(hub), workers=2, order="random", seed=3)
    tuner = tuner_for(hub, tmp_path / "s", executor, fast_surrogate)
    result = tuner.run()
    assert result.epochs_spent == 8 and tuner.optimizer.budget_spent == 8
    assert len(set(_trained(tuner))) == 8 and len(executor.history) == 8
    assert executor.most_in_flight == 2 and executor.started == 1
    assert not tuner.optimizer.running
    assert {d["worker"] for d in tuner.optimizer.decisions} == {"w0", "w1"}
    assert "worker" in (tmp_path / "s" / "trajectory.csv").read_text().splitlines()[0]
    assert any(d.get("pending") == 1.0 for d in tuner.optimizer.decisions)  # decided with the other epoch pending
    state = StudyDirectory(tmp_path / "s").load_state()
    assert "running" not in state
    # every epoch's checkpoint came from its own attempt; the paused trials keep exactly one
    paused = [t for t in tuner.optimizer.trials.values() if t.status == TrialStatus.PAUSED]
    assert len(list((tmp_path / "s" / "trials").glob("*/*.ckpt"))) == len(paused)


def test_sync_mode_with_one_worker_equals_the_in_process_study(hub, tmp_path, fast_surrogate):
    sequential = tuner_for(hub, tmp_path / "seq", _inner(hub), fast_surrogate, budget=6)
    sequential.run()
    concurrent = tuner_for(
        hub, tmp_path / "conc", SequencedExecutor(_inner(hub), workers=1, mode="sync"), fast_surrogate, budget=6
    )
    concurrent.run()
    assert decisions(concurrent) == decisions(sequential)
    best_a = torch.load(tmp_path / "seq" / "best.ckpt", weights_only=True)["state_dict"]
    best_b = torch.load(tmp_path / "conc" / "best.ckpt", weights_only=True)["state_dict"]
    assert best_a.keys() == best_b.keys() and all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_sync_mode_decides_the_same_whatever_order_the_epochs_end_in(hub, tmp_path, fast_surrogate):
    runs = []
    for order_seed in (0, 1):
        executor = SequencedExecutor(_inner(hub), workers=2, order="random", seed=order_seed, mode="sync")
        tuner = tuner_for(hub, tmp_path / f"s{order_seed}", executor, fast_surrogate, budget=6)
        tuner.run()
        runs.append(decisions(tuner))
    assert runs[0] == runs[1]
    assert len({(t, e) for _, t, e, _ in runs[0]}) == 6


def test_a_lost_workers_epoch_is_given_back_and_trained_again(hub, tmp_path, fast_surrogate):
    executor = SequencedExecutor(_inner(hub), workers=2, lose={(0, 1): 1, (1, 1): 1})
    tuner = tuner_for(hub, tmp_path / "s", executor, fast_surrogate, budget=6)
    tuner.run()
    assert tuner.optimizer.epochs_spent == 6 and len(set(_trained(tuner))) == 6
    assert len(executor.history) == 8  # two attempts lost, not charged
    assert not any(t.status == TrialStatus.FAILED for t in tuner.optimizer.trials.values())


def test_an_epoch_lost_three_times_is_recorded_as_failed(hub, tmp_path, fast_surrogate):
    executor = SequencedExecutor(_inner(hub), workers=1, lose={(0, 1): 5})
    tuner = tuner_for(hub, tmp_path / "s", executor, fast_surrogate, budget=3)
    tuner.run()
    first = [d for d in tuner.optimizer.decisions if d["trial"] == 0]
    assert tuner.optimizer.trials[0].status == TrialStatus.FAILED
    assert "lost 3 times" in tuner.optimizer.trials[0].error and len(first) == 1
    assert tuner.optimizer.epochs_spent == 3


def test_a_rerun_gives_back_what_a_killed_driver_had_in_flight(hub, tmp_path, fast_surrogate):
    study_dir = tmp_path / "s"
    first = tuner_for(hub, study_dir, SequencedExecutor(_inner(hub), workers=2), fast_surrogate, budget=3)
    first.run()
    # what a driver killed with -9 leaves: two claims in the saved state, a torn temporary file, an orphan file
    optimizer = first.optimizer
    optimizer.budget = 8
    for _ in range(2):
        assert optimizer.claim({"driver": "gone", "pid": 0}) is not None
    first.ledger.save(optimizer)
    trial_dir = StudyDirectory(study_dir).trial_dir(0)
    (trial_dir / ".epoch-9.d99.ckpt.123.tmp").write_bytes(b"torn")
    (trial_dir / "epoch-9.d99.ckpt").write_bytes(b"orphan")
    assert len(StudyDirectory(study_dir).load_state()["running"]) == 2

    rerun = tuner_for(hub, study_dir, SequencedExecutor(_inner(hub), workers=2), fast_surrogate, budget=8)
    rerun.run()
    assert rerun.optimizer.epochs_spent == 8 and len(set(_trained(rerun))) == 8
    assert _trained(rerun)[:3] == _trained(first)[:3]  # every committed epoch kept
    assert not list(study_dir.rglob("*.tmp")) and not (trial_dir / "epoch-9.d99.ckpt").exists()


def test_decisions_go_on_with_the_latest_fit_while_a_copy_refits(hub, tmp_path, fast_surrogate):
    executor = SequencedExecutor(_inner(hub), workers=2, refit="background")
    tuner = tuner_for(hub, tmp_path / "s", executor, fast_surrogate, budget=8)
    tuner.run()
    assert tuner.optimizer.epochs_spent == 8 and len(set(_trained(tuner))) == 8
    assert any(d.get("current_fit") == 1.0 for d in tuner.optimizer.decisions)


def test_frozen_layers_run_on_several_workers_within_the_budget(hub, tmp_path, fast_surrogate):
    executor = SequencedExecutor(_inner(hub), workers=2, order="newest")
    tuner = tuner_for(hub, tmp_path / "s", executor, fast_surrogate, budget=4, frozen_layers=[0.5])
    tuner.run()
    optimizer = tuner.optimizer
    assert optimizer.budget_spent <= 4 + 1e-9 and optimizer.is_done or not optimizer.candidates(99)
    assert {job.trainable_fraction for job in executor.history} <= {0.5, 1.0}
    assert len(set(_trained(tuner))) == len(optimizer.decisions)
