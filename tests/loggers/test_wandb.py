"""W&B logging, offline only: what the study run and the trial runs hold, read back from the offline run files.

The runs are read by the ``read_offline_runs`` fixture (tests/loggers/conftest.py: why and how it reads them).
"""

import csv
import json
import sys

import pytest
import yaml

from lightning_fms import FMSTuner, SearchSpace
from lightning_fms.errors import FMSError
from lightning_fms.zoo import DigitsDataModule, ImageClassifier


# ---------------------------------------------------------------------------------------------- the Python API
@pytest.fixture
def logged_tuner(hub, fast_surrogate):
    """``logged_tuner(study, budget, logger, searcher="dyhpo", cap=2) -> FMSTuner`` observed by ``logger``."""

    def make(study, budget, logger, searcher="dyhpo", cap=2):
        space = SearchSpace.from_dict(
            {"hub": {"type": "hub", "choices": ["mlp-xs", "cnn-xs"]},
             "model.lr": {"type": "float", "low": 1e-2, "high": 0.3, "log": True},
             "data.batch_size": {"type": "categorical", "choices": [32, 64]}},
            hub_entries=hub.names,
        )  # fmt: skip
        return FMSTuner(
            ImageClassifier, DigitsDataModule, space, hub=hub, study_dir=study, budget=budget, monitor="val_acc",
            mode="max", max_epochs_per_trial=cap, searcher=searcher, num_fresh_candidates=8,
            surrogate_options=dict(fast_surrogate), datamodule_options={"task": "target"},
            trainer_options={"accelerator": "cpu", "devices": 1}, progress=False, observers=[logger],
        )  # fmt: skip

    return make


def test_study_run_and_trial_runs_hold_the_study(logged_tuner, read_offline_runs, tmp_path):
    from lightning_fms.loggers import WandbStudyLogger

    study = tmp_path / "s1"
    tuner = logged_tuner(study, 5, WandbStudyLogger(project="fms-test", mode="offline", tags=["t"]))
    tuner.run()
    runs = read_offline_runs(study / "wandb")
    studies = [r for r in runs if r["job_type"] == "study"]
    trials = {r["config"]["trial"]: r for r in runs if r["job_type"] == "trial"}
    assert len(studies) == 1 and set(trials) == set(tuner.optimizer.trials)
    assert {r["group"] for r in runs} == {"s1"} and {r["project"] for r in runs} == {"fms-test"}
    assert all(r["exit"] == 0 for r in runs)

    run = studies[0]
    assert run["name"] == "s1-study"
    assert run["config"]["monitor"] == "val_acc" and run["config"]["budget"] == 5
    assert run["config"]["space"]["model.lr"]["log"] is True
    assert ("epochs_spent", "") in run["metrics"] and ("*", "epochs_spent") in run["metrics"]
    trajectory = list(csv.DictReader((study / "trajectory.csv").open()))
    per_epoch = [h for h in run["history"] if "best_so_far" in h]
    assert [h["epochs_spent"] for h in per_epoch] == [int(r["epochs_spent"]) for r in trajectory] == [1, 2, 3, 4, 5]
    assert [h["best_so_far"] for h in per_epoch] == pytest.approx([float(r["best_so_far"]) for r in trajectory])
    assert [h["trial"] for h in per_epoch] == [int(r["trial"]) for r in trajectory]
    regret = [h for h in run["history"] if "regret" in h]
    final = per_epoch[-1]["best_so_far"]
    assert [h["epochs_spent"] for h in regret] == [1, 2, 3, 4, 5]
    assert [h["regret"] for h in regret] == pytest.approx([abs(final - h["best_so_far"]) for h in per_epoch])
    assert regret[-1]["regret"] == 0 and regret[-1]["regret_normalised"] == 0
    assert regret[0]["regret_normalised"] in (0, 1)
    results = json.loads((study / "results.json").read_text())
    assert run["summary"]["best_value"] == pytest.approx(results["best"]["value"])
    assert run["summary"]["best_trial"] == results["best"]["trial"]
    assert run["summary"]["epochs_spent"] == 5
    assert run["config"]["_wandb.visualize.regret_plot"]["panel_config"]["fieldSettings"] == {
        "x": "epochs_spent", "y": "regret", "stroke": None}  # fmt: skip
    table_path = run["dir"] / "files" / run["summary"]["trials.path"]
    table = json.loads(table_path.read_text())
    assert table["columns"][:5] == ["trial", "status", "epochs", "best_val_acc", "last_val_acc"]
    assert {"hub", "model.lr", "data.batch_size"} <= set(table["columns"])
    assert len(table["data"]) == len(tuner.optimizer.trials)

    for trial_id, trial_run in trials.items():
        trial = tuner.optimizer.trials[trial_id]
        assert trial_run["name"] == f"s1-trial-{trial_id}"
        assert trial_run["config"] == {**trial.config, "trial": trial_id}  # hub entry and hyperparameters
        assert ("*", "epoch") in trial_run["metrics"]
        assert [h["epoch"] for h in trial_run["history"]] == list(range(1, trial.epochs + 1))
        assert [h["val_acc"] for h in trial_run["history"]] == pytest.approx(trial.values)
        assert all({"val_loss", "train_loss"} <= set(h) for h in trial_run["history"])
        assert trial_run["summary"]["best_val_acc"] == pytest.approx(max(trial.values))
        assert trial_run["summary"]["status"] == trial.status.value and trial_run["summary"]["epochs"] == trial.epochs


def test_a_restarted_study_opens_new_runs_that_replay_what_was_recorded(logged_tuner, read_offline_runs, tmp_path):
    from lightning_fms.loggers import WandbStudyLogger

    study = tmp_path / "s2"
    # random search starts trials 0 and 1, then continues the newest: trial 1 trains epoch 1 before the
    # "crash" and epochs 2-3 after it
    logged_tuner(study, 2, WandbStudyLogger(mode="offline"), searcher="random", cap=3).run()
    first = {r["id"] for r in read_offline_runs(study / "wandb")}
    tuner = logged_tuner(study, 4, WandbStudyLogger(mode="offline"), searcher="random", cap=3)  # the restart
    tuner.run()
    new = [r for r in read_offline_runs(study / "wandb") if r["id"] not in first]
    study_run = next(r for r in new if r["job_type"] == "study")
    assert [h["epochs_spent"] for h in study_run["history"] if "best_so_far" in h] == [1, 2, 3, 4]  # 1-2 replayed
    resumed = [r for r in new if r["job_type"] == "trial" and "resumed_at_epoch" in r["config"]]
    assert len(resumed) == 1
    run, trial = resumed[0], tuner.optimizer.trials[resumed[0]["config"]["trial"]]
    assert run["config"]["resumed_at_epoch"] == 2 and trial.epochs == 3
    assert [h["epoch"] for h in run["history"]] == [1, 2, 3]
    assert [h["val_acc"] for h in run["history"]] == pytest.approx(trial.values)  # epoch 1 replayed
    assert "train_loss" not in run["history"][0] and "train_loss" in run["history"][1]


def test_without_wandb_the_logger_says_what_to_install(monkeypatch):
    from lightning_fms.loggers import WandbStudyLogger

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(FMSError, match=r"pip install 'lightning_fms\[wandb\]'"):
        WandbStudyLogger(project="p")


# ---------------------------------------------------------------------------------------------- through the CLI
def test_a_sweep_file_through_the_cli_logs_runs_keyed_like_the_sweep(
    in_cli_dir, make_cli, fast_tuner_flags, read_offline_runs, tmp_path
):
    study = tmp_path / "s3"
    cli = make_cli("fit", "--config", "cfg.yaml", "--tuner", "fms", "--tuner.space", "sweep.yaml",
                   "--tuner.hub_key", "model.pretrained", "--tuner.budget", "3", "--tuner.max_epochs_per_trial", "2",
                   "--tuner.study_dir", str(study), "--tuner.wandb.project", "fms-digits", "--tuner.wandb.mode",
                   "offline", "--tuner.wandb.dir", str(tmp_path / "wb"), *fast_tuner_flags)  # fmt: skip
    runs = read_offline_runs(tmp_path / "wb")
    sweep = yaml.safe_load((in_cli_dir / "sweep.yaml").read_text())
    trial_runs = [r for r in runs if r["job_type"] == "trial"]
    assert len(trial_runs) == len(cli.tune_result and json.loads((study / "study.json").read_text())["trials"])
    for run in trial_runs:
        assert set(run["config"]) - {"trial"} == set(sweep["parameters"])  # the keys W&B's sweep pages read
        assert run["config"]["model.pretrained"] in sweep["parameters"]["model.pretrained"]["values"]
        assert all("val_acc" in h for h in run["history"])
    assert sum(r["job_type"] == "study" for r in runs) == 1
