"""``lightning-fms agent``: the user's own script, run once per decision, by one agent or two at once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_fms.search.optimizer import FreezeThawOptimizer
from lightning_fms.search.searcher import build_searcher
from lightning_fms.search.space import SearchSpace
from lightning_fms.study.directory import StudyDirectory

SCRIPT = '''
"""A user's fine-tuning script: argparse, a Trainer, and FMSCheckpointCallback() -- nothing else of FMS."""
import argparse
import json
import os

parser = argparse.ArgumentParser()
parser.add_argument("--model.lr", dest="lr", type=float, default=0.05)
parser.add_argument("--data.batch_size", dest="batch_size", type=int, default=32)
parser.add_argument("--ckpt_path", default=None)
parser.add_argument("--fail", action="store_true")
args = parser.parse_args()
if args.fail and args.lr > 0.03:
    raise SystemExit("boom: learning rate too high for this script")
# a log of what was trained, to check that no (trial, epoch) is trained twice
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "trained.log"), "a") as log:
    log.write(json.dumps([int(os.environ["LIGHTNING_FMS_TRIAL"]), int(os.environ["LIGHTNING_FMS_EPOCH"]),
                          args.ckpt_path]) + "\\n")

import torch
from lightning.pytorch import Trainer

from lightning_fms import FMSCheckpointCallback
from lightning_fms.zoo import MLP, DigitsDataModule, ImageClassifier

torch.set_num_threads(1)
torch.manual_seed(0)
module = ImageClassifier(net=MLP(num_classes=5, hidden=8), lr=args.lr, max_epochs=3)
data = DigitsDataModule(task="target", batch_size=args.batch_size)
trainer = Trainer(max_epochs=3, callbacks=[FMSCheckpointCallback()], logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  accelerator="cpu", devices=1)
trainer.fit(module, datamodule=data, ckpt_path=args.ckpt_path, weights_only=True)
'''

SPACE = {
    "model.lr": {"type": "float", "low": 1e-2, "high": 0.1, "log": True},
    "data.batch_size": {"type": "categorical", "choices": [32, 64]},
}


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "train.py").write_text(SCRIPT)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return tmp_path


def agent_args(
    workdir: Path, study: Path, *extra: str, script_args: tuple[str, ...] = (), budget: int = 6
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lightning_fms.cli",
        "agent",
        "--study_dir",
        str(study),
        "--space",
        str(workdir / "space.yaml"),
        "--budget",
        str(budget),
        "--max_epochs_per_trial",
        "3",
        "--monitor",
        "val_acc",
        "--searcher",
        "random",
        *extra,
        "--",
        sys.executable,
        str(workdir / "train.py"),
        *script_args,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def trained(workdir: Path) -> list[list]:
    path = workdir / "trained.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def check_state(study: Path, budget: int = 6) -> dict:
    state = StudyDirectory(study).load_state()
    assert state["epochs_spent"] == budget
    assert not state.get("running")
    assert [d["epochs_spent"] for d in state["decisions"]] == list(range(1, budget + 1))
    for trial in state["trials"]:
        assert trial["status"] != "running"
    return state


@pytest.mark.slow  # real processes end to end (tens of seconds); make test-slow, run by CI
def test_one_agent_spends_the_budget_and_resumes_trials(workdir, capsys):
    study = workdir / "s"
    proc = subprocess.run(agent_args(workdir, study), capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["epochs_spent"] == 6 and summary["epochs_trained_here"] == 6
    state = check_state(study)
    runs = trained(workdir)
    assert len(runs) == 6 and len({(t, e) for t, e, _ in runs}) == 6
    for trial_id, epoch, ckpt in runs:  # a later epoch resumes from the trial's previous checkpoint
        assert (ckpt is None) == (epoch == 1)
        if ckpt is not None:
            assert ckpt.endswith(f"{trial_id:04d}/epoch-{epoch - 1}.ckpt")
    for trial in state["trials"]:
        assert len(trial["values"]) >= 1
    assert (study / "results.json").exists() and (study / "trajectory.csv").exists()
    assert (study / "best.ckpt").exists() and (study / "regret.png").exists()
    assert json.loads((study / "results.json").read_text())["epochs_spent"] == 6
    # checkpoint policy: only paused trials keep one checkpoint, that of their newest epoch
    ckpts = sorted(p.relative_to(study).as_posix() for p in (study / "trials").glob("*/*.ckpt"))
    expected = sorted(
        f"trials/{t['id']:04d}/epoch-{len(t['values'])}.ckpt" for t in state["trials"] if t["status"] == "paused"
    )
    assert ckpts == expected
    # a finished study: another agent joins (no settings needed), finds nothing to do
    from lightning_fms.cli import main

    capsys.readouterr()
    assert main(["agent", "--study_dir", str(study), "--", "python", "x.py"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs_trained_here"] == 0


def test_two_agents_share_one_study(workdir):
    study = workdir / "s"
    procs = [
        subprocess.Popen(
            agent_args(workdir, study), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
    here = [json.loads(out)["epochs_trained_here"] for out, _ in outs]
    assert sum(here) == 6
    check_state(study)
    runs = trained(workdir)
    assert len(runs) == 6
    assert len({(t, e) for t, e, _ in runs}) == 6, runs  # no (trial, epoch) trained twice


def test_failing_script_fails_the_trial_and_the_agent_goes_on(workdir):
    study = workdir / "s"
    proc = subprocess.run(
        agent_args(workdir, study, script_args=("--fail",), budget=4),
        capture_output=True,
        text=True,
        timeout=300,
        env=env(),
    )
    assert proc.returncode == 0, proc.stderr
    state = check_state(study, budget=4)
    failed = [t for t in state["trials"] if t["status"] == "failed"]
    assert failed, state["trials"]
    assert all("boom: learning rate too high" in t["error"] for t in failed)
    assert any(t["status"] != "failed" for t in state["trials"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_fms.cli", *args], capture_output=True, text=True, timeout=120, env=env()
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("lightning-fms: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def main_error(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """``lightning-fms ARGS`` in this process (cheaper than a subprocess), as a CompletedProcess."""
    from lightning_fms.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def test_bad_input_is_one_line(workdir, capsys):
    study = str(workdir / "s")
    space = str(workdir / "space.yaml")
    # one real process: exit status and stderr as the shell sees them
    assert_one_line_error(run_cli("agent", "--study_dir", study, "--", "python", "x.py"), "--space")
    assert_one_line_error(main_error(capsys, "agent", "--study_dir", study), "command after '--'")
    assert_one_line_error(
        main_error(capsys, "agent", "--study_dir", study, "--space", space, "--", "python", "x.py"), "--budget"
    )
    assert_one_line_error(
        main_error(capsys, "agent", "--study_dir", study, "--space", space, "--budget", "3", "--", "python", "x.py"),
        "--monitor",
    )
    assert_one_line_error(
        main_error(capsys, "agent", "--study_dir", study, "--bogus", "1", "--", "python", "x.py"), "--bogus"
    )
    assert not (workdir / "s" / "state.pt").exists()


def test_tune_and_agent_studies_refuse_each_other(workdir, tmp_path, capsys):
    from lightning_fms.study.directory import StudyDirectory

    # a study written by the tuner (state with a "tuner" section) refuses agents
    space = SearchSpace.from_dict(SPACE)
    optimizer = FreezeThawOptimizer(space, build_searcher("random", space, 3), budget=3, max_epochs_per_trial=3)
    tuned = StudyDirectory(tmp_path / "tuned")
    tuned.path.mkdir()
    tuned.save_state({**optimizer.state_dict(), "tuner": {"checkpoints": {}, "best": None}})
    assert_one_line_error(
        main_error(capsys, "agent", "--study_dir", str(tuned.path), "--", "python", "x.py"), "lightning-fms tune"
    )
    # a study held by a running tuner (another process) refuses agents
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; h = open(sys.argv[1], 'a+'); "
            "fcntl.flock(h, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(tmp_path / "held.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        held = tmp_path / "held"
        held.mkdir()
        (tmp_path / "held.lock").rename(held / ".lock")
        assert_one_line_error(
            main_error(capsys, "agent", "--study_dir", str(held), "--", "python", "x.py"),
            "in use by lightning-fms tune",
        )
    finally:
        holder.kill()
        holder.wait()


def test_tuner_refuses_an_agent_study(tmp_path):
    from lightning_fms.errors import FMSError
    from lightning_fms.study.directory import StudyDirectory
    from lightning_fms.tuner import FMSTuner
    from lightning_fms.zoo import DigitsDataModule, ImageClassifier

    space = SearchSpace.from_dict(SPACE)
    optimizer = FreezeThawOptimizer(space, build_searcher("random", space, 3), budget=3, max_epochs_per_trial=3)
    study = StudyDirectory(tmp_path / "a")
    study.path.mkdir()
    study.save_state({**optimizer.state_dict(), "agent": {"settings": {}, "checkpoints": {}, "best": None}})
    tuner = FMSTuner(
        ImageClassifier,
        DigitsDataModule,
        space,
        study_dir=study.path,
        budget=3,
        monitor="val_acc",
        max_epochs_per_trial=3,
        searcher="random",
        progress=False,
    )
    with pytest.raises(FMSError, match="lightning-fms agent"):
        tuner.run()


def test_claim_complete_release():
    space = SearchSpace.from_dict(SPACE)
    opt = FreezeThawOptimizer(space, build_searcher("random", space, 2), budget=3, max_epochs_per_trial=2)
    a = opt.claim({"pid": 1})
    b = opt.claim({"pid": 2})
    c = opt.claim({"pid": 3})
    assert a and b and c and len({a.trial_id, b.trial_id, c.trial_id}) == 3
    assert opt.claim({"pid": 4}) is None  # the budget is spoken for by running epochs
    restored = FreezeThawOptimizer(space, build_searcher("random", space, 2), budget=3, max_epochs_per_trial=2)
    restored.load_state_dict(opt.state_dict())
    assert set(restored.running) == {a.trial_id, b.trial_id, c.trial_id}
    restored.complete(a.trial_id, 1, 0.5)
    restored.complete(b.trial_id, 1, 0.0, error="boom")
    restored.release(c.trial_id)
    assert c.trial_id not in restored.trials and restored.epochs_spent == 2
    d = restored.claim({"pid": 5})
    assert d is not None
    restored.complete(d.trial_id, d.epoch, 0.7)
    assert restored.is_done and restored.claim({"pid": 6}) is None
    assert restored.trials[b.trial_id].error == "boom"


def test_dead_agents_epochs_are_given_back_and_settings_are_checked(workdir):
    from lightning_fms.agent import AgentSettings, StudyAgent
    from lightning_fms.errors import FMSError

    study = workdir / "s"
    settings = AgentSettings(
        space_file=str(workdir / "space.yaml"), budget=4, monitor="val_acc", max_epochs_per_trial=2, searcher="random"
    )
    first = StudyAgent(study, ["true"], settings)
    first.study.path.mkdir()
    optimizer, ledger = first._load()  # creates the study
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_owner = {"host": first.owner["host"], "pid": gone.pid, "started": 0.0}
    lost = optimizer.claim(dead_owner)
    mine = optimizer.claim(first.owner)
    ledger.save(optimizer)

    joiner = StudyAgent(study, ["true"])  # no settings: joins
    optimizer, ledger = joiner._load()
    assert set(optimizer.running) == {lost.trial_id, mine.trial_id}
    assert joiner._reap(optimizer)  # the dead agent's epoch is given back; a live agent's is kept
    assert set(optimizer.running) == {mine.trial_id}
    assert lost.trial_id not in optimizer.trials
    assert ledger.settings["budget"] == 4 and ledger.settings["mode"] == "max"

    with pytest.raises(FMSError, match="budget=4, not 7"):
        StudyAgent(study, ["true"], AgentSettings(budget=7))._load()
    with pytest.raises(FMSError, match="command"):
        StudyAgent(study, [])
