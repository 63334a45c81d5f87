"""FMSLightningCLI: a drop-in LightningCLI whose `fit --tuner fms` runs a study, each trial built by the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_fms.errors import FMSError
from lightning_fms.lightning_cli import rewrite_tuner_flag


def test_rewrite_tuner_flag(tmp_path):
    assert rewrite_tuner_flag(["fit", "--tuner", "fms", "--tuner.budget", "3"]) == [
        "fit",
        "--tuner.name=fms",
        "--tuner.budget",
        "3",
    ]
    assert rewrite_tuner_flag(["fit", "--tuner=fms"]) == ["fit", "--tuner.name=fms"]
    assert rewrite_tuner_flag(["fit", "--tuner", "null"]) == ["fit", "--tuner.name=null"]
    group = tmp_path / "tuner.yaml"
    group.write_text("name: fms\n")
    assert rewrite_tuner_flag(["fit", "--tuner", str(group)]) == ["fit", "--tuner", str(group)]  # a group config file
    with pytest.raises(FMSError, match=r"unknown --tuner value 'optuna' \(supported: fms\)"):
        rewrite_tuner_flag(["fit", "--tuner", "optuna"])
    with pytest.raises(FMSError, match="needs a value"):
        rewrite_tuner_flag(["fit", "--tuner"])


def test_without_tuner_it_is_lightning_cli(make_cli, tmp_path):
    cli = make_cli("fit", "--config", "cfg.yaml", "--model.pretrained", "weights/cnn-s.safetensors",
                   "--trainer.default_root_dir", str(tmp_path),
                   "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                   "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")  # fmt: skip
    assert cli.tune_result is None
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    assert cli.model.hparams.pretrained == "weights/cnn-s.safetensors"
    assert cli.config.fit.tuner.name is None
    assert (tmp_path / "config.yaml").exists()  # LightningCLI's SaveConfigCallback ran


def _trial_config(study: Path, trial_id: int) -> dict:
    return next(t["config"] for t in json.loads((study / "study.json").read_text())["trials"] if t["id"] == trial_id)


def test_each_trial_is_built_by_the_cli_and_its_checkpoint_records_what_it_trained_with(
    in_cli_dir, make_cli, tmp_path, fast_tuner_flags
):
    study = tmp_path / "study"
    cli = make_cli("fit", "--config", "cfg.yaml", "--tuner", "fms", "--tuner.space", "space.yaml",
                   "--tuner.budget", "4", "--tuner.max_epochs_per_trial", "2", "--tuner.study_dir", str(study),
                   "--tuner.max_epochs_key", "model.max_epochs", *fast_tuner_flags)  # fmt: skip
    result = cli.tune_result
    assert result is not None and result.epochs_spent == 4
    files = {f"weights/{n}.safetensors": str((in_cli_dir / "weights" / f"{n}.safetensors").resolve())
             for n in ("mlp-s", "cnn-s", "resnet-xs")}  # fmt: skip

    def expected(config):
        return {"pretrained": files[config["model.pretrained"]], "lr": config["model.lr"],
                "momentum": config["model.momentum"], "max_epochs": 2}  # fmt: skip

    checkpoints = [(study / "best.ckpt", result.best_trial)]
    checkpoints += [(p, int(p.parent.name)) for p in sorted(study.glob("trials/*/epoch-*.ckpt"))]
    assert len(checkpoints) >= 2
    for path, trial_id in checkpoints:
        config = _trial_config(study, trial_id)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        hparams = saved["hyper_parameters"]
        assert {k: hparams[k] for k in ("pretrained", "lr", "momentum", "max_epochs")} == expected(config), path
        assert saved["datamodule_hyper_parameters"]["batch_size"] == config["data.batch_size"]

    trial_dirs = sorted(p for p in (study / "trials").iterdir() if p.is_dir())
    assert len(trial_dirs) == len(json.loads((study / "study.json").read_text())["trials"])
    for trial_dir in trial_dirs:
        dumped = yaml.safe_load((trial_dir / "config.yaml").read_text())
        config = _trial_config(study, int(trial_dir.name))
        assert "tuner" not in dumped
        assert {k: dumped["model"][k] for k in ("pretrained", "lr", "momentum", "max_epochs")} == expected(config)
        assert dumped["data"]["batch_size"] == config["data.batch_size"]

    replay = make_cli("fit", "--config", str(trial_dirs[0] / "config.yaml"), "--trainer.max_epochs", "1",
                      "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                      "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path))  # fmt: skip
    assert replay.tune_result is None
    assert replay.model.hparams.lr == _trial_config(study, int(trial_dirs[0].name))["model.lr"]


def cli(*args, cwd, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # one torch thread, as in this process
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def assert_one_line_error(returncode, stderr, *fragments):
    assert returncode == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("lightning-fms: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_lightning_fms_fit_without_a_script(cli_dir, tmp_path, fast_tuner_flags, monkeypatch, capsys):
    from lightning_fms.cli import main

    # as the console script starts: the current directory is not importable, `digits` not imported yet; `fit`
    # makes the current directory importable (sys.path and sys.modules are restored when the test ends)
    monkeypatch.chdir(cli_dir)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(cli_dir))])
    monkeypatch.setitem(sys.modules, "digits", None)
    del sys.modules["digits"]
    study = tmp_path / "study"
    code = main(["fit", "--model", "digits.DigitsFineTuner",
                 "--data", "lightning_fms.zoo.DigitsDataModule", "--config", "cfg.yaml",
                 "--tuner", "fms", "--tuner.space", "sweep.yaml", "--tuner.hub_key", "model.pretrained",
                 "--tuner.max_epochs_key", "model.init_args.max_epochs", "--tuner.budget", "3",
                 "--tuner.max_epochs_per_trial", "2", "--tuner.study_dir", str(study), *fast_tuner_flags])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out[out.index("{") :])
    assert summary["epochs_spent"] == 3
    hparams = torch.load(study / "best.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["_class_path"] == "digits.DigitsFineTuner"
    assert hparams["lr"] == summary["best_config"]["model.lr"]  # the sweep's `model.lr` is model.init_args.lr
    assert hparams["max_epochs"] == 2
    assert hparams["pretrained"] == str((cli_dir / summary["best_config"]["model.pretrained"]).resolve())


BAD_INPUTS = {  # issue 5's four: three in this process, the deepest (the metric) through the real script
    "unknown tuner": (["--tuner", "optuna"], ["unknown --tuner value 'optuna' (supported: fms)"]),
    "key not in config": (
        ["--tuner", "fms", "--tuner.space", "{model.lrr: {type: float, low: 0.1, high: 0.2}}", "--tuner.monitor",
         "val_acc", "--tuner.mode", "max"],
        ["space key 'model.lrr' is not in the parsed config", "lr, max_epochs, momentum"],
    ),
    "unsupported distribution": (
        ["--tuner", "fms", "--tuner.space", "{parameters: {model.lr: {distribution: q_uniform, min: 0, max: 1, q: 0.1}}}"],
        ["distribution 'q_uniform' is not supported (supported: categorical, constant, int_uniform, log_uniform, "
         "log_uniform_values, uniform)"],
    ),
    "metric never logged": (
        ["--tuner", "fms", "--tuner.space", "space.yaml", "--tuner.monitor", "val_nope", "--tuner.mode", "max"],
        ["metric 'val_nope' was never logged", "val_acc"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", [name for name in BAD_INPUTS if name != "metric never logged"])
def test_bad_input_gets_one_line_and_exit_2_before_training(make_cli, tmp_path, capsys, name):
    args, fragments = BAD_INPUTS[name]
    study = tmp_path / "study"
    with pytest.raises(SystemExit) as info:
        make_cli("fit", "--config", "cfg.yaml", *args, "--tuner.study_dir", str(study), "--tuner.budget", "2")
    assert_one_line_error(info.value.code, capsys.readouterr().err, *fragments)
    assert not (study / "state.pt").exists() and not (study / "trials").exists()


def test_the_training_script_reports_bad_input_in_one_line_and_exit_2_before_training(cli_dir, tmp_path):
    """``python train.py fit ... --tuner fms``, a real process: one error line, exit status 2, no traceback.

    The metric is found missing in the one-batch check of the first trial the CLI builds, the deepest of the bad
    inputs, so the script's whole way (parse, build a trial, check it, report) runs in a fresh interpreter here.
    """
    args, fragments = BAD_INPUTS["metric never logged"]
    study = tmp_path / "study"
    proc = cli("train.py", "fit", "--config", "cfg.yaml", *args, "--tuner.study_dir", str(study),
               "--tuner.budget", "2", cwd=cli_dir)  # fmt: skip
    assert_one_line_error(proc.returncode, proc.stderr, *fragments)
    assert not (study / "state.pt").exists() and not (study / "trials").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tuner.space", "{model.max_epochs: {type: float, low: 1, high: 3}}", "--tuner.monitor", "val_acc",
          "--tuner.mode", "max"], "space key 'model.max_epochs' = 1.0: the config parser rejects it"),
        (["--tuner.space", "{model.pretrained: {type: hub, choices: [nope.safetensors]}}", "--tuner.monitor",
          "val_acc", "--tuner.mode", "max"], "weights file 'nope.safetensors' does not exist"),
        (["--tuner.space", "{trainer.max_epochs: {type: int, low: 1, high: 3}}", "--tuner.monitor", "val_acc",
          "--tuner.mode", "max"], "the tuner sets trainer.max_epochs itself"),
        (["--tuner.space", "{model.lr: {type: float, low: 0.01, high: 0.1}}"], "give --tuner.monitor"),
        (["--tuner.space", "{model.lr: {type: float, low: 0.01, high: 0.1}}", "--tuner.monitor", "val_acc"],
         "give --tuner.mode max or min"),
        (["--tuner.space", "sweep.yaml", "--tuner.hub_key", "model.lr"], "must be a categorical over weight files"),
        (["--tuner.space", "space.yaml", "--tuner.monitor", "val_loss"], "give --tuner.mode max or min for 'val_loss'"),
        (["--tuner.space", "space.yaml", "--ckpt_path", "x.ckpt"], "--ckpt_path cannot be combined with --tuner"),
        ([], "needs --tuner.space"),
    ],
)  # fmt: skip
def test_more_bad_input_in_process(make_cli, tmp_path, capsys, args, fragment):
    with pytest.raises(SystemExit) as info:
        make_cli("fit", "--config", "cfg.yaml", "--tuner", "fms", "--tuner.study_dir", str(tmp_path / "s"), *args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert_one_line_error(2, err, fragment)
    assert not (tmp_path / "s").exists()


def test_tuner_only_runs_fit(make_cli, capsys):
    with pytest.raises(SystemExit) as info:
        make_cli("test", "--config", "cfg.yaml", "--tuner", "fms")
    assert info.value.code == 2
    assert_one_line_error(2, capsys.readouterr().err, "--tuner runs with the 'fit' subcommand")


def test_wandb_options_without_wandb_say_what_to_install(make_cli, tmp_path, monkeypatch, capsys, fast_tuner_flags):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(SystemExit) as info:
        make_cli("fit", "--config", "cfg.yaml", "--tuner", "fms", "--tuner.space", "space.yaml",
                 "--tuner.study_dir", str(tmp_path / "s"), "--tuner.wandb.project", "p", *fast_tuner_flags)  # fmt: skip
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "lightning-fms: error: W&B logging needs the wandb package: pip install 'lightning_fms[wandb]'" in err
    assert not (tmp_path / "s" / "trials").exists()


def test_hub_weight_files_feed_the_featurizer(make_cli, tmp_path, fast_tuner_flags):
    """FMS through the CLI: the weight files of the hub choice are the featurizer's starting weights."""
    study = tmp_path / "study"
    cli = make_cli("fit", "--config", "cfg.yaml", "--tuner", "fms", "--tuner.space", "space.yaml",
                   "--tuner.budget", "4", "--tuner.max_epochs_per_trial", "2", "--tuner.study_dir", str(study),
                   "--tuner.max_epochs_key", "model.max_epochs", "--tuner.weights", "stats",
                   *fast_tuner_flags)  # fmt: skip
    assert cli.tune_result is not None and cli.tune_result.epochs_spent == 4
    # every trained epoch left a weight snapshot for the featurizer, as safetensors, and so did each hub choice's
    # pretrained weights
    snapshots = sorted(p.name for p in (study / "weights").glob("trial-*.safetensors"))
    assert len(snapshots) == 4
    assert list((study / "weights").glob("hub-*.safetensors"))
    assert cli.tune_result.best_value is not None


def test_frozen_layers_through_the_cli(make_cli, tmp_path, fast_tuner_flags):
    """`--tuner.frozen_layers` turns on the second fidelity: frozen epochs are charged less than a full one."""
    import csv

    study = tmp_path / "study"
    cli = make_cli("fit", "--config", "cfg.yaml", "--tuner", "fms", "--tuner.space", "space.yaml",
                   "--tuner.budget", "2", "--tuner.max_epochs_per_trial", "2", "--tuner.study_dir", str(study),
                   "--tuner.max_epochs_key", "model.max_epochs", "--tuner.frozen_layers", "[0.25]",
                   *fast_tuner_flags)  # fmt: skip
    assert cli.tune_result is not None
    with open(study / "trajectory.csv") as f:
        rows = list(csv.DictReader(f))
    fractions = [float(r["trainable_fraction"]) for r in rows]
    assert 0.25 in fractions and set(fractions) <= {0.25, 1.0}
    # frozen epochs cost less than one full epoch each: more epochs than the budget, never more budget
    assert len(rows) > 2 and float(rows[-1]["budget_spent"]) <= 2.0 + 1e-9
    # the trial checkpoints record how many units the FrozenUnits callback left trainable
    ckpt = next(study.glob("trials/*/epoch-*.ckpt"))
    states = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]
    assert any(key.startswith("FrozenUnits") for key in states)
