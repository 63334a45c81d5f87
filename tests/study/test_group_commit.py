"""Group commit: epochs that ended together are committed with one state save, nothing deleted before it."""

from __future__ import annotations

import pytest
import torch

from lightning_fms.search.optimizer import FreezeThawOptimizer
from lightning_fms.search.searcher import build_searcher
from lightning_fms.search.space import SearchSpace
from lightning_fms.study.directory import StudyDirectory
from lightning_fms.study.ledger import StudyLedger
from lightning_fms.training.executor import EpochOutcome

SPACE = SearchSpace.from_dict({"model.lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True}})


class Saves:
    """Counts the study's state saves."""

    def __init__(self, study: StudyDirectory) -> None:
        self.count = 0
        save_state = study.save_state

        def counted(*args, **kwargs):
            self.count += 1
            return save_state(*args, **kwargs)

        study.save_state = counted


def make(tmp_path):
    study = StudyDirectory(tmp_path / "s")
    opt = FreezeThawOptimizer(
        SPACE, build_searcher("random", SPACE, 3), budget=12, max_epochs_per_trial=3, num_startup_trials=3
    )
    return study, StudyLedger(study, monitor="val_acc", mode="max"), opt


def train(ledger: StudyLedger, suggestion) -> EpochOutcome:
    path = ledger.attempt_checkpoint_path(suggestion.trial_id, suggestion.epoch, suggestion.decision)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"trial": suggestion.trial_id, "epoch": suggestion.epoch}, path)
    return EpochOutcome(value=0.1 * suggestion.epoch + 0.01 * suggestion.trial_id, wall_s=0.1)


def claim_train_commit(ledger, opt, workers=3):
    """Claim one epoch per worker, train them, commit them together; the checkpoints of the batch."""
    batch = [opt.claim({"worker": w}) for w in range(workers)]
    outcomes = [train(ledger, s) for s in batch]
    with ledger.batch(opt):
        for s, outcome in zip(batch, outcomes, strict=True):
            path = ledger.attempt_checkpoint_path(s.trial_id, s.epoch, s.decision)
            ledger.commit(opt, s.trial_id, s.epoch, outcome, claimed=True, checkpoint=path)
    return batch


def test_a_batch_saves_the_state_once_at_its_end(tmp_path):
    study, ledger, opt = make(tmp_path)
    saves = Saves(study)
    claim_train_commit(ledger, opt)
    assert saves.count == 1 and study.load_state()["epochs_spent"] == 3
    batch = [opt.claim({"worker": w}) for w in range(3)]
    outcomes = [train(ledger, s) for s in batch]
    with ledger.batch(opt):
        for s, outcome in zip(batch, outcomes, strict=True):
            path = ledger.attempt_checkpoint_path(s.trial_id, s.epoch, s.decision)
            ledger.commit(opt, s.trial_id, s.epoch, outcome, claimed=True, checkpoint=path)
            assert study.load_state()["epochs_spent"] == 3  # nothing saved yet
            assert len(list((study.path / "trials").glob("*/*.ckpt"))) == 6  # nor deleted: the old state holds
    assert saves.count == 2 and study.load_state()["epochs_spent"] == 6
    state = study.load_state()
    kept = sorted(p.relative_to(study.path).as_posix() for p in (study.path / "trials").glob("*/*.ckpt"))
    assert kept == sorted(ref["path"] for ref in state["tuner"]["checkpoints"].values())


def test_a_release_inside_a_batch_is_saved_with_it_and_batches_nest(tmp_path):
    study, ledger, opt = make(tmp_path)
    saves = Saves(study)
    first, second = opt.claim({"worker": 0}), opt.claim({"worker": 1})
    outcome = train(ledger, first)
    with ledger.batch(opt):
        with ledger.batch(opt):
            path = ledger.attempt_checkpoint_path(first.trial_id, first.epoch, first.decision)
            ledger.commit(opt, first.trial_id, first.epoch, outcome, claimed=True, checkpoint=path)
        opt.release(second.trial_id)  # its worker was lost
        ledger.save(opt)
        assert saves.count == 0
    assert saves.count == 1
    state = study.load_state()
    assert state["epochs_spent"] == 1 and "running" not in state


def test_what_a_batch_committed_before_an_error_is_saved(tmp_path):
    study, ledger, opt = make(tmp_path)
    s = opt.claim({"worker": 0})
    outcome = train(ledger, s)
    with pytest.raises(RuntimeError, match="is not running"), ledger.batch(opt):
        path = ledger.attempt_checkpoint_path(s.trial_id, s.epoch, s.decision)
        ledger.commit(opt, s.trial_id, s.epoch, outcome, claimed=True, checkpoint=path)
        ledger.commit(opt, s.trial_id, s.epoch, outcome, claimed=True, checkpoint=path)  # twice: refused
    assert study.load_state()["epochs_spent"] == 1
