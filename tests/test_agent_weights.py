"""``lightning-fms agent`` with a model hub and weight featurizers: the user's script trains, the agent reads weights.

The study an agent runs with the user's own script (a LightningCLI script left as it is, the callback added on the
command line; or a plain script) is the study ``lightning-fms tune`` runs with the same hub, space and settings:
the same trials, epochs and values, in order, and the same weights after every epoch, bit for bit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lightning_fms.agent import AgentSettings, StudyAgent
from lightning_fms.cli import main
from lightning_fms.hub import HubEntry, ModelHub, load_weights_file
from lightning_fms.study.directory import StudyDirectory
from lightning_fms.study.snapshots import DESCRIPTION_KEY
from lightning_fms.training.executor import EpochOutcome
from lightning_fms.weights.registry import FEATURIZERS

ENTRIES = ("mlp-s", "cnn-s", "resnet-xs")  # three families: the GMN featurizer reads three architectures

FINETUNE = '''
"""The user's LightningModule: ImageClassifier on a network built from a self-describing weights file."""
import importlib
import json

from safetensors import safe_open
from safetensors.torch import load_file

from lightning_fms.zoo import ImageClassifier


def load_backbone(path):
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    module_name, _, name = meta["class_path"].rpartition(".")
    net = getattr(importlib.import_module(module_name), name)(**json.loads(meta["init_args"]))
    net.load_state_dict(load_file(path))
    return net


class FileFineTuner(ImageClassifier):
    def __init__(
        self,
        backbone: str,
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        dropout: float = 0.0,
        max_epochs: int = 20,
    ):
        super().__init__(load_backbone(backbone), lr=lr, weight_decay=weight_decay, momentum=momentum,
                         dropout=dropout, max_epochs=max_epochs)
'''

CLI_SCRIPT = '''
"""A LightningCLI training script, as it is: the study adds FMSCheckpointCallback on the command line."""
from lightning.pytorch.cli import LightningCLI

from finetune import FileFineTuner
from lightning_fms.zoo import DigitsDataModule

if __name__ == "__main__":
    LightningCLI(FileFineTuner, DigitsDataModule)
'''

PLAIN_SCRIPT = '''
"""A plain training script: argparse, a Trainer, and FMSCheckpointCallback() -- nothing else of FMS."""
import argparse

from lightning.pytorch import Trainer

from finetune import FileFineTuner
from lightning_fms import FMSCheckpointCallback
from lightning_fms.zoo import DigitsDataModule

parser = argparse.ArgumentParser()
parser.add_argument("--model.backbone", dest="backbone")
parser.add_argument("--model.lr", dest="lr", type=float)
parser.add_argument("--model.dropout", dest="dropout", type=float)
parser.add_argument("--data.batch_size", dest="batch_size", type=int)
parser.add_argument("--ckpt_path", default=None)
args = parser.parse_args()
with open("received.log", "a") as log:
    log.write(args.backbone + "\\n")
callback = FMSCheckpointCallback()  # first: under the agent it seeds the run, as the tuner seeds a trial
module = FileFineTuner(args.backbone, lr=args.lr, dropout=args.dropout, max_epochs=2)
trainer = Trainer(max_epochs=2, callbacks=[callback], logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
trainer.fit(module, datamodule=DigitsDataModule(task="target", batch_size=args.batch_size),
            ckpt_path=args.ckpt_path, weights_only=True)
'''

STAND_IN = '''
"""Stands in for a script whose callback recorded the wrong submodule: the hub network's head, or none at all."""
import json, os, sys
import numpy as np
from safetensors.numpy import save_file

env = os.environ
with open(env["LIGHTNING_FMS_CHECKPOINT"], "wb") as out:
    out.write(b"a checkpoint")
result = {"epoch": int(env["LIGHTNING_FMS_EPOCH"]), "value": 0.5, "error": None, "weights": None,
          "weights_error": "FileFineTuner has no submodule 'backbone'" if "--missing" in sys.argv else None}
if "--missing" not in sys.argv:
    save_file({"weight": np.zeros((5, 8), np.float32), "bias": np.zeros(5, np.float32)}, env["LIGHTNING_FMS_WEIGHTS"])
    result["weights"] = env["LIGHTNING_FMS_WEIGHTS"]
with open(env["LIGHTNING_FMS_RESULT"], "w") as out:
    json.dump(result, out)
'''

SPACE = {
    "model.backbone": {"type": "hub"},  # named as the argument that receives the entry's weights file
    "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},  # draws random numbers in training
    "data.batch_size": {"type": "categorical", "choices": [32, 64]},
}
FAST = {"full_fit_steps": 60, "refine_steps": 10, "full_fits": 2}


@pytest.fixture(scope="module")
def workdir(hub, tmp_path_factory) -> Path:
    """Scripts, space, and a hub whose weights files describe their network (so the script can build it)."""
    directory = tmp_path_factory.mktemp("agent-hub")
    entries = []
    for name in ENTRIES:
        entry = hub.entry(name)
        path = directory / "weights" / f"{name}.safetensors"
        path.parent.mkdir(exist_ok=True)
        meta = {"class_path": entry.class_path, "init_args": json.dumps(entry.init_args)}
        save_file(load_weights_file(entry.weights, entry.sha256), str(path), metadata=meta)
        entries.append(HubEntry(name, entry.family, entry.class_path, entry.init_args, path))
    ModelHub(entries, name="files").to_yaml(directory / "hub.yaml")
    (directory / "finetune.py").write_text(FINETUNE)
    (directory / "train.py").write_text(CLI_SCRIPT)
    (directory / "plain.py").write_text(PLAIN_SCRIPT)
    (directory / "stand_in.py").write_text(STAND_IN)
    (directory / "space.yaml").write_text(yaml.safe_dump({"monitor": "val_acc", "mode": "max", "space": SPACE}))
    return directory


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the scripts train at one thread, as this process does
    return workdir


def run_main(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(list(args)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def tune(capsys, workdir: Path, study: Path, budget: int, cap: int, weights: str, **options) -> None:
    """``lightning-fms tune`` of the recipe that trains what the scripts train: ImageClassifier on the hub module."""
    recipe = {
        "hub": "hub.yaml",
        "model": {"class_path": "lightning_fms.zoo.ImageClassifier"},
        "data": {"class_path": "lightning_fms.zoo.DigitsDataModule", "init_args": {"task": "target"}},
        "space": SPACE,
        "monitor": "val_acc",
        "budget": budget,
        "max_epochs_per_trial": cap,
        "tuner": {"weights": weights, "num_fresh_candidates": 16, "surrogate_options": FAST, **options},
        "trainer": {"accelerator": "cpu", "devices": 1},
    }
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_main(capsys, "tune", "--config", "recipe.yaml", "--study_dir", str(study), "--no-progress")


def agent(capsys, study: Path, budget: int, cap: int, weights: str, *command: str, **options) -> dict:
    extra = [item for name, value in options.items() for item in (f"--{name}", str(value))]
    return run_main(
        capsys, "agent", "--study_dir", str(study), "--space", "space.yaml", "--hub", "hub.yaml",
        "--budget", str(budget), "--max_epochs_per_trial", str(cap), "--weights", weights,
        "--num_fresh_candidates", "16", "--surrogate_options", json.dumps(FAST), "--quiet", *extra,
        "--", sys.executable, *command,
    )  # fmt: skip


def assert_same_study(tuned: Path, agents: Path, budget: int) -> None:
    """Same decisions (trial, epoch, kind, value, in order), configurations and weights after every epoch."""
    key = lambda d: (d["decision"], d["kind"], d["trial"], d["epoch"], d["value"])  # noqa: E731
    left = StudyDirectory(tuned).load_state()
    right = StudyDirectory(agents).load_state()
    assert [key(d) for d in right["decisions"]] == [key(d) for d in left["decisions"]]
    assert len(left["decisions"]) == budget and all(d["value"] == d["value"] for d in left["decisions"])
    assert [t["config"] for t in right["trials"]] == [t["config"] for t in left["trials"]]
    snapshots = sorted(p.name for p in (tuned / "weights").glob("*.safetensors"))
    assert snapshots == sorted(p.name for p in (agents / "weights").glob("*.safetensors"))
    assert len([name for name in snapshots if name.startswith("trial-")]) == budget
    assert [name for name in snapshots if name.startswith("hub-")] == [f"hub-{e}.safetensors" for e in sorted(ENTRIES)]
    for name in snapshots:
        a, b = load_file(str(tuned / "weights" / name)), load_file(str(agents / "weights" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # nothing is left beside the results: the study keeps its own snapshot of each epoch's weights
    assert not list((agents / "trials").glob("*/*.safetensors"))


@pytest.mark.slow
def test_an_fms_study_with_a_hub_and_gmn_through_the_agent_is_the_tuners(in_workdir, capsys, tmp_path):
    """An unchanged LightningCLI script plus the callback: the agent's study equals ``lightning-fms tune``'s."""
    budget, cap = 6, 3
    (in_workdir / "cfg.yaml").write_text(yaml.safe_dump({
        "model": {"max_epochs": cap},  # the LR schedule's horizon: the study's per-trial cap, as the recipe's
        "data": {"task": "target"},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": cap, "enable_progress_bar": False,
                    "enable_model_summary": False, "enable_checkpointing": False,
                    "default_root_dir": str(tmp_path / "logs")},
    }))  # fmt: skip
    tune(capsys, in_workdir, tmp_path / "tuned", budget, cap, "gmn")
    summary = agent(
        capsys, tmp_path / "agents", budget, cap, "gmn",
        "train.py", "fit", "--config", "cfg.yaml", "--trainer.callbacks+=lightning_fms.FMSCheckpointCallback",
    )  # fmt: skip
    assert summary["epochs_spent"] == summary["epochs_trained_here"] == budget
    assert_same_study(tmp_path / "tuned", tmp_path / "agents", budget)
    state = StudyDirectory(tmp_path / "agents").load_state()
    assert state["agent"]["settings"]["weights"] == "gmn"
    assert any(d["kind"] == "resume" for d in state["decisions"])  # resumed trials continue in the script too
    # each hub entry's W_0 is described for later studies (what lightning-fms pretrain reads)
    with open(tmp_path / "agents" / "weights" / "hub-cnn-s.safetensors", "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    assert "parameters" in json.loads(header["__metadata__"][DESCRIPTION_KEY])


@pytest.mark.slow
def test_the_default_fms_study_reads_summary_features_through_a_plain_script(in_workdir, capsys, tmp_path):
    """``weights: auto`` (summary features for fms on a hub) with a plain script; the script receives the path."""
    budget, cap = 3, 2  # one random start, then two decisions of the surrogate on the weights after epoch 1
    tune(capsys, in_workdir, tmp_path / "tuned", budget, cap, "auto", num_startup_trials=1)
    (in_workdir / "received.log").unlink(missing_ok=True)
    agent(capsys, tmp_path / "agents", budget, cap, "auto", "plain.py", num_startup_trials=1)
    assert_same_study(tmp_path / "tuned", tmp_path / "agents", budget)
    received = (in_workdir / "received.log").read_text().split()
    assert len(received) == budget and {Path(p).name for p in received} <= {f"{e}.safetensors" for e in ENTRIES}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in received)


@pytest.mark.parametrize(
    ("flag", "fragment"),
    [("--recorded", "(submodule 'head') are not hub entry"), ("--missing", "has no submodule 'backbone'")],
)
def test_weights_that_are_not_the_hub_network_stop_the_agent_in_one_line(in_workdir, capsys, tmp_path, flag, fragment):
    study = tmp_path / "s"
    capsys.readouterr()
    code = main(["agent", "--study_dir", str(study), "--space", "space.yaml", "--hub", "hub.yaml", "--budget", "2",
                 "--max_epochs_per_trial", "2", "--weights_attribute", "head", "--quiet",
                 "--", sys.executable, "stand_in.py", flag])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("lightning-fms: error:")]
    assert fragment in line and "Traceback" not in err
    state = StudyDirectory(study).load_state()
    assert state["epochs_spent"] == 0 and not state.get("running")  # the claimed epoch was given back


def test_hub_settings_are_refused_in_one_line(in_workdir, capsys, tmp_path):
    def error(*args: str) -> str:
        capsys.readouterr()
        assert main(["agent", "--study_dir", str(tmp_path / "s"), *args, "--budget", "2", "--monitor", "val_acc",
                     "--", "true"]) == 2  # fmt: skip
        return capsys.readouterr().err

    assert "a hub choice needs a model hub" in error("--space", "space.yaml")  # {type: hub} takes the hub's entries
    listed = tmp_path / "listed.yaml"
    listed.write_text(yaml.safe_dump({"model.backbone": {"type": "hub", "choices": ["mlp-s", "cnn-s"]}}))
    assert "hub choice 'model.backbone' needs --hub" in error("--space", str(listed))
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"model.lr": SPACE["model.lr"]}))
    assert "--hub needs a hub choice in the space" in error("--space", str(plain), "--hub", "hub.yaml")
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"model.backbone": {"type": "hub", "choices": ["vit-s"]}}))
    assert "unknown hub entry 'vit-s'" in error("--space", str(other), "--hub", "hub.yaml")
    assert not (tmp_path / "s" / "state.pt").exists()


@pytest.mark.parametrize("weights", FEATURIZERS)
def test_every_featurizer_reads_the_hub_and_the_committed_weights_through_the_agent(in_workdir, tmp_path, weights):
    """The agent's own loop (claim, commit with the script's weights, reload) with each featurizer of the registry.

    No script trains here: each claimed epoch is committed as the callback would leave it (a checkpoint file and the
    entry's weights, moved a little), so the decisions from the third on are the surrogate's, on those weights.
    """
    settings = AgentSettings(space_file="space.yaml", hub="hub.yaml", budget=4, monitor="val_acc",
                             max_epochs_per_trial=2, weights=weights, num_startup_trials=1, num_fresh_candidates=8,
                             promotion_probability=0.0, surrogate_options=FAST)  # fmt: skip
    agent = StudyAgent(tmp_path / "s", ["true"], settings)
    agent.study.path.mkdir()
    hub = ModelHub.from_yaml("hub.yaml")
    for step in range(4):
        optimizer, ledger = agent._load()  # a fresh optimizer from the stored state, as every agent decision
        claimed = optimizer.claim(agent.owner)
        assert claimed is not None
        ledger.save(optimizer)
        optimizer, ledger = agent._load()
        checkpoint = ledger.checkpoint_path(claimed.trial_id, claimed.epoch)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"a checkpoint")
        state = {k: v + 0.01 * (step + 1) for k, v in hub.build(claimed.config["model.backbone"]).state_dict().items()}
        outcome = EpochOutcome(value=0.5 + 0.1 * step, weights=state)
        ledger.commit(optimizer, claimed.trial_id, claimed.epoch, outcome, claimed=True)
    final = StudyDirectory(tmp_path / "s").load_state()
    assert final["epochs_spent"] == 4 and final["agent"]["settings"]["weights"] == weights
    assert ["acquisition" in d for d in final["decisions"]] == [False, False, True, True]  # fitted on the weights
    kept = sorted(p.name for p in (tmp_path / "s" / "weights").iterdir())
    assert len([name for name in kept if name.startswith("trial-")]) == 4
    assert [name for name in kept if name.startswith("hub-")] == [f"hub-{e}.safetensors" for e in sorted(ENTRIES)]
