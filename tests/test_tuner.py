import csv
import json

import pytest
import torch

from lightning_fms import CheckpointError, FMSError, FMSTuner, SearchSpace, StudyLockedError, TrialStatus
from lightning_fms.observer import StudyObserver
from lightning_fms.study.directory import StudyDirectory
from lightning_fms.study.reports import TRAJECTORY_COLUMNS
from lightning_fms.zoo import DigitsDataModule, ImageClassifier

SPACE_SPEC = {
    "hub": {"type": "hub"},
    "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
}


class FlakyClassifier(ImageClassifier):
    """Fails on purpose: ``fault='raise'`` raises in epoch 2, ``fault='nan'`` makes the loss NaN."""

    def __init__(self, net, fault: str = "ok", **kwargs):
        super().__init__(net, **kwargs)
        self.fault = fault

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.fault == "raise" and self.current_epoch == 1:
            raise RuntimeError("injected failure")
        if self.fault == "nan":
            return loss * float("nan")
        return loss


class RecordingObserver(StudyObserver):
    def __init__(self):
        self.calls = []

    def on_study_start(self, study):
        self.calls.append(("start", study.epochs_spent))

    def on_epoch_end(self, study, trial, epoch, metrics):
        self.calls.append(("epoch", trial.id, epoch, metrics.get("val_acc")))

    def on_study_end(self, study):
        self.calls.append(("end", study.epochs_spent))


class SilentClassifier(ImageClassifier):
    def validation_step(self, batch, batch_idx):
        return None


@pytest.fixture
def make_tuner(hub, fast_surrogate):
    """``make_tuner(study_dir, module=ImageClassifier, space_spec=SPACE_SPEC, **options) -> FMSTuner`` on the hub."""

    def make(study_dir, module=ImageClassifier, space_spec=SPACE_SPEC, **kw):
        options = {
            "budget": 8,
            "monitor": "val_acc",
            "max_epochs_per_trial": 3,
            "seed": 0,
            "num_fresh_candidates": 16,
            "surrogate_options": dict(fast_surrogate),
            "trainer_options": {"accelerator": "cpu"},
            "progress": False,
        }
        options.update(kw)
        space = SearchSpace.from_dict(space_spec, hub_entries=hub.names)
        return FMSTuner(module, DigitsDataModule, space, study_dir=study_dir, hub=hub, **options)

    return make


def test_study_spends_budget_and_writes_outputs(make_tuner, hub, tmp_path):
    observer = RecordingObserver()
    tuner = make_tuner(tmp_path / "study", observers=[observer])
    result = tuner.run()
    assert result.epochs_spent == 8
    assert observer.calls[0] == ("start", 0) and observer.calls[-1] == ("end", 8)
    epochs = [c for c in observer.calls if c[0] == "epoch"]
    assert [(c[1], c[2]) for c in epochs] == [(d["trial"], d["epoch"]) for d in tuner.optimizer.decisions]
    assert [c[3] for c in epochs] == pytest.approx([d["value"] for d in tuner.optimizer.decisions])
    results = json.loads((tmp_path / "study/results.json").read_text())
    assert results["epochs_spent"] == 8
    best = results["best"]
    assert set(best) >= {"trial", "hub_entry", "hyperparameters", "value", "checkpoint"}
    assert best["hub_entry"] in hub.names and 0.0 <= best["value"] <= 1.0
    assert best["value"] == max(max(t["best_value"] for t in results["trials"] if t["best_value"] is not None), 0)
    assert sum(results["epochs_by_family"].values()) == 8
    with open(tmp_path / "study/trajectory.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == TRAJECTORY_COLUMNS
    assert [int(r["epochs_spent"]) for r in rows] == list(range(1, 9))
    best_so_far = [float(r["best_so_far"]) for r in rows]
    assert best_so_far == sorted(best_so_far)
    assert (tmp_path / "study/regret.png").stat().st_size > 1000
    # the best checkpoint loads without unpickling code and holds the best trial's weights
    state = torch.load(tmp_path / "study/best.ckpt", weights_only=True)
    assert state["epoch"] == best["epoch"]  # Lightning stores the number of completed epochs
    # checkpoint policy: one per paused trial, none for finished ones, plus best.ckpt
    ckpts = sorted(p.relative_to(tmp_path / "study") for p in (tmp_path / "study/trials").rglob("*.ckpt"))
    paused = [t for t in tuner.optimizer.trials.values() if t.status == TrialStatus.PAUSED]
    assert len(ckpts) == len(paused)
    for trial in paused:
        assert (tmp_path / "study" / "trials" / f"{trial.id:04d}" / f"epoch-{trial.epochs}.ckpt").exists()
    # each trial's CSV log keeps every epoch across its resumed fits
    for trial in tuner.optimizer.trials.values():
        with open(tmp_path / "study" / "trials" / f"{trial.id:04d}" / "logs" / "metrics.csv") as handle:
            logged = [r for r in csv.DictReader(handle) if r.get("val_acc")]
        assert [int(r["epoch"]) for r in logged] == list(range(trial.epochs))
        assert [float(r["val_acc"]) for r in logged] == pytest.approx(trial.values)
    # rerunning a finished study resumes and trains nothing more
    again = make_tuner(tmp_path / "study").run()
    assert again.epochs_spent == 8 and again.best_value == result.best_value


def test_failing_and_diverging_trials_are_recorded_and_the_study_goes_on(make_tuner, tmp_path):
    spec = {**SPACE_SPEC, "model.fault": {"type": "categorical", "choices": ["ok", "raise", "nan"]}}
    tuner = make_tuner(tmp_path / "study", module=FlakyClassifier, space_spec=spec, budget=10, searcher="random")
    result = tuner.run()
    assert result.epochs_spent == 10
    trials = tuner.optimizer.trials.values()
    failed = [t for t in trials if t.status == TrialStatus.FAILED]
    assert failed, "some trial must have hit a fault"
    for trial in failed:
        if trial.config["model.fault"] == "raise":
            assert "RuntimeError: injected failure" in trial.error and trial.epochs == 1
        else:
            assert "not finite" in trial.error or "nan" in trial.error.lower()
    assert all(t.config["model.fault"] != "ok" for t in failed)
    assert result.best_value is not None
    results = json.loads((tmp_path / "study/results.json").read_text())
    assert any(t["error"] for t in results["trials"])


def test_metric_never_logged_stops_before_recording_anything(make_tuner, tmp_path):
    tuner = make_tuner(tmp_path / "study", module=SilentClassifier)
    with pytest.raises(FMSError, match="'val_acc' was never logged"):
        tuner.run()
    assert not (tmp_path / "study/state.pt").exists()


def test_tampered_checkpoint_is_refused_and_state_kept(make_tuner, tmp_path):
    make_tuner(tmp_path / "study", budget=4, searcher="random").run()
    before = (tmp_path / "study/state.pt").read_bytes()
    (ckpt,) = list((tmp_path / "study/trials").rglob("*.ckpt"))
    ckpt.write_bytes(ckpt.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="modified after the study wrote it"):
        make_tuner(tmp_path / "study", budget=6, searcher="random").run()
    assert (tmp_path / "study/state.pt").read_bytes() == before


def test_second_tuner_on_the_same_study_is_refused(make_tuner, tmp_path):
    holder = StudyDirectory(tmp_path / "study")
    holder.lock()
    try:
        with pytest.raises(StudyLockedError, match="in use by another tuner"):
            make_tuner(tmp_path / "study").run()
    finally:
        holder.unlock()


@pytest.mark.parametrize("weights", ["gmn", "stats"])
def test_fms_study_with_weights_resumes_with_the_same_decisions(make_tuner, tmp_path, weights):
    straight = make_tuner(tmp_path / "straight", weights=weights, budget=9)
    straight.run()
    make_tuner(tmp_path / "split", weights=weights, budget=5).run()
    resumed = make_tuner(tmp_path / "split", weights=weights, budget=9)  # a new process would do the same
    resumed.run()
    key = lambda d: (d["trial"], d["epoch"], d["value"])  # noqa: E731
    assert [key(d) for d in resumed.optimizer.decisions] == [key(d) for d in straight.optimizer.decisions]
    # snapshots of every trained epoch, and each hub entry's pretrained weights once, are on disk for the
    # featurizer, never pickled
    snapshots = sorted(p.name for p in (tmp_path / "split/weights").iterdir())
    assert all(name.endswith(".safetensors") for name in snapshots)
    assert len([name for name in snapshots if name.startswith("trial-")]) == 9
    assert [name for name in snapshots if name.startswith("hub-")] == sorted(
        f"hub-{entry}.safetensors" for entry in resumed.space["hub"].choices
    )


def test_featurizer_that_cannot_read_the_hub_is_refused_before_training(make_tuner, tmp_path):
    # NFN embeds what is not a plain chain from statistics unless told not to
    with pytest.raises(FMSError, match="weights='nfn' cannot embed hub entry"):
        make_tuner(tmp_path / "study", weights="nfn", featurizer_options={"fallback": False})
    assert not (tmp_path / "study/state.pt").exists()
