"""Throttled reports: the state is saved on every commit, the reports (and study.json) at most every N seconds."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lightning_fms.search.optimizer import FreezeThawOptimizer
from lightning_fms.search.searcher import build_searcher
from lightning_fms.search.space import SearchSpace
from lightning_fms.study.directory import StudyDirectory
from lightning_fms.study.ledger import StudyLedger
from lightning_fms.training.executor import EpochOutcome

SPACE = SearchSpace.from_dict({"model.lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True}})


def commit_next(ledger: StudyLedger, opt: FreezeThawOptimizer) -> None:
    s = opt.ask()
    path = ledger.checkpoint_path(s.trial_id, s.epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"trial": s.trial_id, "epoch": s.epoch}, path)
    ledger.commit(opt, s.trial_id, s.epoch, EpochOutcome(value=0.1 * s.epoch, wall_s=0.1))


def trajectory_rows(study: StudyDirectory) -> int:
    return len((study.path / "trajectory.csv").read_text().splitlines()) - 1


def readable_epochs(study: StudyDirectory) -> int:
    return json.loads((study.path / "study.json").read_text())["epochs_spent"]


def make(tmp_path, interval: float | None) -> tuple[StudyDirectory, StudyLedger, FreezeThawOptimizer]:
    study = StudyDirectory(tmp_path / "s")
    opt = FreezeThawOptimizer(SPACE, build_searcher("random", SPACE, 3), budget=6, max_epochs_per_trial=3)
    return study, StudyLedger(study, monitor="val_acc", mode="max", report_interval_s=interval), opt


def test_between_rewrites_the_state_is_saved_and_the_reports_wait(tmp_path):
    study, ledger, opt = make(tmp_path, interval=3600.0)
    for epochs in range(1, 5):
        commit_next(ledger, opt)
        assert study.load_state()["epochs_spent"] == epochs  # state.pt: every commit
        ledger.save(opt)  # a driver's save between commits (a claim) does not write study.json either
    assert trajectory_rows(study) == 1 and readable_epochs(study) == 1  # written by the first commit only
    ledger.write_reports(opt, final=True)
    assert trajectory_rows(study) == 4 and readable_epochs(study) == 4
    assert json.loads((study.path / "results.json").read_text())["epochs_spent"] == 4


def test_the_reports_are_rewritten_once_the_interval_has_passed(tmp_path):
    study, ledger, opt = make(tmp_path, interval=0.3)
    commit_next(ledger, opt)
    commit_next(ledger, opt)
    assert trajectory_rows(study) == 1
    time.sleep(0.35)
    commit_next(ledger, opt)
    assert trajectory_rows(study) == 3 and readable_epochs(study) == 3


@pytest.mark.parametrize("interval", [0.0, None])
def test_without_an_interval_every_commit_rewrites_them(tmp_path, interval):
    study, ledger, opt = make(tmp_path, interval=interval)
    for epochs in range(1, 4):
        commit_next(ledger, opt)
        assert trajectory_rows(study) == epochs and readable_epochs(study) == epochs


def test_a_bad_interval_is_refused(tmp_path):
    with pytest.raises(ValueError, match="report_interval_s"):
        StudyLedger(StudyDirectory(tmp_path / "s"), monitor="m", mode="max", report_interval_s=-1.0)
