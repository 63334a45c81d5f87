"""The study ledger: one commit path for the tuner and the agents, and the checkpoint policy it owns.

The epochs are not trained here: a checkpoint is a small real file written where a trainer would write it,
so these tests check the ledger itself (what is referenced, kept, copied, deleted and saved).
"""

import json
import math

import pytest
import torch

from lightning_fms.atomic import sha256_file
from lightning_fms.errors import CheckpointError
from lightning_fms.search.optimizer import FreezeThawOptimizer, SuggestionKind
from lightning_fms.search.searcher import build_searcher
from lightning_fms.search.space import SearchSpace
from lightning_fms.search.trial import TrialStatus
from lightning_fms.study.directory import StudyDirectory
from lightning_fms.study.ledger import BestEpoch, CheckpointRef, StudyLedger
from lightning_fms.study.reports import trajectory_rows
from lightning_fms.study.snapshots import WeightSnapshots
from lightning_fms.training.executor import EpochOutcome

SPACE = SearchSpace.from_dict({"model.lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True}})


def optimizer(budget=8, cap=3, startup=1, **kw):
    """Random search: after ``startup`` fresh trials it resumes the newest paused trial until it finishes."""
    searcher = build_searcher("random", SPACE, cap)
    return FreezeThawOptimizer(
        SPACE, searcher, budget=budget, max_epochs_per_trial=cap, num_startup_trials=startup, **kw
    )


def value_of(trial_id, epoch):
    return 0.1 * trial_id + 0.2 * epoch  # later epochs and later trials are better


def train(ledger, suggestion, fail=False, weights=None):
    """What an executor does: write the epoch's checkpoint (resumed from the verified previous one)."""
    trial_id, epoch = suggestion.trial_id, suggestion.epoch
    if suggestion.kind == SuggestionKind.RESUME:
        previous = torch.load(ledger.resume_checkpoint(trial_id), weights_only=True)
        assert previous["epoch"] == epoch - 1
    if fail:
        return EpochOutcome(error="RuntimeError: boom", wall_s=0.5)
    path = ledger.checkpoint_path(trial_id, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"trial": trial_id, "epoch": epoch, "state_dict": {"w": torch.full((3,), float(epoch))}}, path)
    return EpochOutcome(value=value_of(trial_id, epoch), wall_s=0.5, weights=weights)


def checkpoints_on_disk(study):
    return sorted(p.relative_to(study.path).as_posix() for p in (study.path / "trials").glob("*/*.ckpt"))


def test_commit_keeps_one_checkpoint_per_paused_trial_and_a_copy_of_the_best(tmp_path):
    study, opt = StudyDirectory(tmp_path / "s"), optimizer()
    ledger = StudyLedger(study, monitor="val_acc", mode="max")
    while (s := opt.ask()) is not None:
        ledger.commit(opt, s.trial_id, s.epoch, train(ledger, s))
        paused = [t for t in opt.trials.values() if t.status == TrialStatus.PAUSED]
        assert checkpoints_on_disk(study) == sorted(f"trials/{t.id:04d}/epoch-{t.epochs}.ckpt" for t in paused)
        state = study.load_state()  # what the state references is on disk with the recorded hash
        assert set(state["tuner"]["checkpoints"]) == {str(t.id) for t in paused}
        for record in state["tuner"]["checkpoints"].values():
            assert sha256_file(study.path / record["path"]) == record["sha256"]
        best = opt.best()
        assert state["tuner"]["best"] == {"trial": best.trial_id, "epoch": best.epoch, "value": best.value}
        saved = torch.load(study.best_checkpoint_path, weights_only=True)
        assert (saved["trial"], saved["epoch"]) == (best.trial_id, best.epoch)
    assert opt.epochs_spent == 8
    assert any(t.status == TrialStatus.FINISHED for t in opt.trials.values())  # finished trials kept nothing
    results = json.loads((study.path / "results.json").read_text())
    assert results["epochs_spent"] == 8 and results["best"]["checkpoint"] == str(study.best_checkpoint_path)
    assert len((study.path / "trajectory.csv").read_text().splitlines()) == 1 + 8


def test_a_kill_before_the_state_is_saved_leaves_the_old_state_pointing_at_an_existing_checkpoint(tmp_path):
    study, opt = StudyDirectory(tmp_path / "s"), optimizer()
    ledger = StudyLedger(study, monitor="val_acc", mode="max")
    s = opt.ask()
    ledger.commit(opt, s.trial_id, s.epoch, train(ledger, s))
    resumed = opt.ask()
    while resumed.kind != SuggestionKind.RESUME:  # the random searcher resumes the newest trial first
        ledger.commit(opt, resumed.trial_id, resumed.epoch, train(ledger, resumed))
        resumed = opt.ask()
    before = (study.path / StudyDirectory.STATE_FILE).read_bytes()
    train(ledger, resumed)  # the new checkpoint is written ... and the process dies before commit()
    assert (study.path / StudyDirectory.STATE_FILE).read_bytes() == before
    # a new process resumes from the old state: its checkpoint is still there and verifies
    again, again_ledger = optimizer(), StudyLedger(study, monitor="val_acc", mode="max")
    state = study.load_state()
    again.load_state_dict(state)
    again_ledger.load_state_dict(state["tuner"])
    old = again_ledger.resume_checkpoint(resumed.trial_id)
    assert old.name == f"epoch-{resumed.epoch - 1}.ckpt"
    assert torch.load(old, weights_only=True)["epoch"] == resumed.epoch - 1
    orphan = again_ledger.checkpoint_path(resumed.trial_id, resumed.epoch)
    assert orphan.exists()
    again_ledger.prune_orphans()  # what no state references goes; what it references stays
    assert not orphan.exists() and old.exists()
    # the resumed study asks for the same epoch again and commits it normally
    s = again.ask()
    assert (s.trial_id, s.epoch) == (resumed.trial_id, resumed.epoch)
    again_ledger.commit(again, s.trial_id, s.epoch, train(again_ledger, s))
    assert not old.exists()


def test_a_failed_epoch_drops_the_trials_checkpoint_and_keeps_the_best(tmp_path):
    study, opt = StudyDirectory(tmp_path / "s"), optimizer(budget=4)
    ledger = StudyLedger(study, monitor="val_acc", mode="max")
    s = opt.ask()
    ledger.commit(opt, s.trial_id, s.epoch, train(ledger, s))
    best_bytes = study.best_checkpoint_path.read_bytes()
    s = opt.ask()
    assert s.kind == SuggestionKind.RESUME
    stopped = ledger.commit(opt, s.trial_id, s.epoch, train(ledger, s, fail=True))
    assert stopped == [] and opt.trials[s.trial_id].status == TrialStatus.FAILED
    assert checkpoints_on_disk(study) == [] and s.trial_id not in ledger.checkpoints
    assert study.best_checkpoint_path.read_bytes() == best_bytes and ledger.best == BestEpoch(s.trial_id, 1, 0.2)
    assert opt.epochs_spent == 2 and math.isnan(opt.decisions[-1]["value"])
    with pytest.raises(CheckpointError, match="has no checkpoint to resume from"):
        ledger.resume_checkpoint(s.trial_id)


def test_trials_stopped_by_the_paused_limit_lose_their_checkpoints(tmp_path):
    study, opt = StudyDirectory(tmp_path / "s"), optimizer(budget=6, cap=3, startup=3, max_paused_trials=1)
    ledger = StudyLedger(study, monitor="val_acc", mode="min")  # min: the newer (higher) trials are worse
    all_stopped = []
    while (s := opt.ask()) is not None:
        all_stopped += ledger.commit(opt, s.trial_id, s.epoch, train(ledger, s))
        paused = [t.id for t in opt.trials.values() if t.status == TrialStatus.PAUSED]
        assert len(paused) <= 1 and sorted(ledger.checkpoints) == paused
        assert len(checkpoints_on_disk(study)) == len(paused)
    assert all_stopped and all(opt.trials[t].status == TrialStatus.STOPPED for t in all_stopped)


def test_weight_snapshots_are_kept_for_successful_epochs_only(tmp_path):
    study, opt = StudyDirectory(tmp_path / "s"), optimizer(budget=2)
    snapshots = WeightSnapshots(study.weights_dir)
    ledger = StudyLedger(study, monitor="val_acc", mode="max", snapshots=snapshots)
    s = opt.ask()
    ledger.commit(opt, s.trial_id, s.epoch, train(ledger, s, weights={"w": torch.arange(3.0)}))
    s = opt.ask()
    ledger.commit(opt, s.trial_id, s.epoch, train(ledger, s, fail=True, weights={"w": torch.zeros(3)}))
    assert sorted(p.name for p in study.weights_dir.iterdir()) == ["trial-0-1.safetensors"]
    assert torch.equal(WeightSnapshots(study.weights_dir).get(("trial", 0, 1))["w"], torch.arange(3.0))


def test_state_round_trip_reads_the_sections_written_before_the_ledger(tmp_path):
    study = StudyDirectory(tmp_path / "s")
    (study.trial_dir(2)).mkdir(parents=True)
    (study.trial_dir(2) / "epoch-3.ckpt").write_bytes(b"weights")
    # the tuner's section as FMSTuner wrote it by hand before the ledger existed
    digest = sha256_file(study.trial_dir(2) / "epoch-3.ckpt")
    old = {
        "checkpoints": {"2": {"path": "trials/0002/epoch-3.ckpt", "sha256": digest}},
        "best": {"trial": 2, "epoch": 3, "value": 0.75},
    }
    ledger = StudyLedger(study, monitor="val_acc", mode="max")
    ledger.load_state_dict(old)
    assert ledger.checkpoints == {2: CheckpointRef("trials/0002/epoch-3.ckpt", digest)}
    assert ledger.best == BestEpoch(2, 3, 0.75) and ledger.best_checkpoint == study.best_checkpoint_path
    assert ledger.resume_checkpoint(2) == study.trial_dir(2) / "epoch-3.ckpt"
    assert ledger.state_dict() == old
    agent = StudyLedger(study, monitor="val_acc", mode="max", section="agent", settings={"budget": 4})
    agent.load_state_dict({"settings": {"budget": 99}, **old})
    assert agent.state_dict() == {"settings": {"budget": 4}, **old}  # the settings given win
    (study.trial_dir(2) / "epoch-3.ckpt").write_bytes(b"weightz")
    with pytest.raises(CheckpointError, match="modified after the study wrote it"):
        ledger.resume_checkpoint(2)


def test_the_agent_and_the_tuner_commit_the_same_files(tmp_path):
    """ask/tell (the tuner) and claim/complete (the agents) through the ledger: the same study on disk."""

    def run(path, claimed):
        study, opt = StudyDirectory(path), optimizer(budget=7, cap=3, startup=3, max_paused_trials=2)
        section, settings = ("agent", {"budget": 7}) if claimed else ("tuner", None)
        ledger = StudyLedger(study, monitor="val_acc", mode="max", section=section, settings=settings)
        for step in range(7):
            s = opt.claim({"pid": 1}) if claimed else opt.ask()
            ledger.commit(opt, s.trial_id, s.epoch, train(ledger, s, fail=step == 4), claimed=claimed)
        return study, study.load_state()

    tuner, tuned = run(tmp_path / "tuner", claimed=False)
    agent, agents = run(tmp_path / "agent", claimed=True)
    assert {t["status"] for t in tuned["trials"]} >= {"failed", "stopped"}  # failures and the paused limit

    def files(study):
        return sorted(p.relative_to(study.path).as_posix() for p in study.path.rglob("*") if p.is_file())

    assert files(tuner) == files(agent)
    for name in files(tuner):
        if name.endswith((".ckpt", ".csv")):
            assert (tuner.path / name).read_bytes() == (agent.path / name).read_bytes(), name
    results = [json.loads((s.path / "results.json").read_text()) for s in (tuner, agent)]
    for r, s in zip(results, (tuner, agent), strict=True):
        assert r["best"].pop("checkpoint") == str(s.best_checkpoint_path)
    assert results[0] == results[1]
    assert agents.pop("agent") == {"settings": {"budget": 7}, **tuned.pop("tuner")}
    assert repr(agents) == repr(tuned)  # repr: the failed epoch's value is NaN


def test_the_view_is_a_read_only_copy(tmp_path):
    study, opt = StudyDirectory(tmp_path / "s"), optimizer(budget=3)
    ledger = StudyLedger(study, monitor="val_acc", mode="max", families={"a": "mlp"})
    s = opt.ask()
    ledger.commit(opt, s.trial_id, s.epoch, train(ledger, s))
    view = ledger.view(opt)
    rows = trajectory_rows(opt, {"a": "mlp"})
    assert view.trajectory() == rows and view.epochs_spent == 1 and view.best.value == value_of(0, 1)
    assert view.path == study.path and view.monitor == "val_acc" and view.families == {"a": "mlp"}
    assert view.best_checkpoint == study.best_checkpoint_path
    with pytest.raises(TypeError):
        view.trials[5] = view.trials[0]
    view.trials[0].values.append(99.0)  # a copy: the study does not change
    assert opt.trials[0].values == [value_of(0, 1)]
    s = opt.ask()
    ledger.commit(opt, s.trial_id, s.epoch, train(ledger, s))
    assert view.epochs_spent == 1 and len(view.decisions) == 1  # and it does not follow the study
