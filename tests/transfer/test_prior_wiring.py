"""A prior reaches the surrogate from every front end, is refused in one line, and a study never changes prior."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser

from lightning_fms.agent import AgentSettings, StudyAgent
from lightning_fms.cli import _parser, main
from lightning_fms.errors import FMSError
from lightning_fms.options import TunerOptions, flag_values, option_names, tuner_arguments
from lightning_fms.recipe import Recipe
from lightning_fms.search.optimizer import FreezeThawOptimizer
from lightning_fms.search.searcher import SurrogateSearcher, build_searcher
from lightning_fms.search.space import SearchSpace
from lightning_fms.surrogate import build_surrogate
from lightning_fms.transfer.prior import Prior, PriorError, save_prior


def one_line_error(stderr: str) -> str:
    """The one ``lightning-fms: error:`` line of a refused command (and no traceback)."""
    lines = [line for line in stderr.strip().splitlines() if line.startswith("lightning-fms: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def snapshot(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> content)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in skip
    }


# ------------------------------------------------------------------------------------------------ build_searcher
def test_build_searcher_refuses_a_prior_for_random_search_and_the_plain_gp(make_prior, recipe_space):
    for name in ("random", "gp"):
        with pytest.raises(FMSError) as error:
            build_searcher(name, recipe_space, cap=3, device="cpu", prior=make_prior())
        assert str(error.value) == f"a prior is for the fms or dyhpo searcher, not {name!r}"


def test_build_searcher_reads_the_path_and_checks_the_prior_before_building(make_prior, recipe_space, tmp_path):
    with pytest.raises(PriorError, match="does not exist"):
        build_searcher("dyhpo", recipe_space, cap=3, device="cpu", prior=tmp_path / "nope.safetensors")
    path = save_prior(make_prior(), tmp_path / "p.safetensors")
    # weights="auto" is resolved first: summary for fms on a hub, which this prior (weights none) was not learned for
    with pytest.raises(PriorError, match=r"learned for searcher 'dyhpo'; this study uses 'fms'"):
        build_searcher("fms", recipe_space, cap=3, device="cpu", prior=str(path))
    fms = save_prior(make_prior(searcher="fms"), tmp_path / "fms.safetensors")
    with pytest.raises(PriorError, match=r"featurizer \(weights\) 'none'; this study uses 'summary'"):
        build_searcher("fms", recipe_space, cap=3, device="cpu", weights="auto", prior=fms)
    with pytest.raises(PriorError, match="this study runs with it"):
        build_searcher("dyhpo", recipe_space, cap=3, device="cpu", frozen_layers=True, prior=path)


def test_a_fitting_prior_gives_the_searcher_its_fingerprint(make_prior, recipe_space):
    prior = make_prior()
    search = build_searcher("dyhpo", recipe_space, cap=3, device="cpu", prior=prior)
    assert search.prior_fingerprint == prior.fingerprint
    assert build_searcher("dyhpo", recipe_space, cap=3, device="cpu").prior_fingerprint is None


# ------------------------------------------------------------------------------------------------ resume
def told(searcher, space: SearchSpace, epochs: int = 2) -> FreezeThawOptimizer:
    """An optimizer of ``searcher`` that was told ``epochs`` startup epochs."""
    opt = FreezeThawOptimizer(space, searcher, budget=6, max_epochs_per_trial=3, num_startup_trials=epochs)
    for value in (0.3, 0.5, 0.4)[:epochs]:
        suggestion = opt.ask()
        opt.tell(suggestion.trial_id, suggestion.epoch, value)
    return opt


def searcher_with(space: SearchSpace, fingerprint: str | None) -> SurrogateSearcher:
    surrogate = build_surrogate("dyhpo", x_dim=space.dim, curve_length=3, device="cpu")
    return SurrogateSearcher(surrogate, prior_fingerprint=fingerprint)


def test_the_study_records_the_prior_and_is_never_resumed_with_another_or_none(recipe_space):
    a, b = "a1" * 32, "b2" * 32
    with_a = told(searcher_with(recipe_space, a), recipe_space).state_dict()
    without = told(searcher_with(recipe_space, None), recipe_space).state_dict()
    assert with_a["settings"]["prior"] == a and "prior" not in without["settings"]  # older studies read the same

    same = FreezeThawOptimizer(recipe_space, searcher_with(recipe_space, a), budget=6, max_epochs_per_trial=3)
    same.load_state_dict(with_a)
    assert same.epochs_spent == 2
    cases = [
        (with_a, None, "holds a study run with a prior (fingerprint a1a1a1a1a1a1); use a new study directory or "
                       "give the same prior"),
        (with_a, b, "holds a study run with another prior (fingerprint a1a1a1a1a1a1, not b2b2b2b2b2b2)"),
        (without, a, "holds a study run without a prior; use a new study directory or leave the prior out"),
    ]  # fmt: skip
    for state, fingerprint, message in cases:
        opt = FreezeThawOptimizer(
            recipe_space, searcher_with(recipe_space, fingerprint), budget=6, max_epochs_per_trial=3
        )
        with pytest.raises(FMSError) as error:
            opt.load_state_dict(state)
        assert message in str(error.value) and "\n" not in str(error.value)
        assert opt.epochs_spent == 0 and not opt.trials  # nothing was taken over


# ------------------------------------------------------------------------------------------------ options, recipe
def test_prior_is_a_tune_flag_a_tuner_option_and_an_fmstuner_argument():
    base = ["tune", "--config", "r.yaml", "--study_dir", "s"]
    given = flag_values(_parser("tune").parse_args([*base, "--prior", "runs/p.safetensors"]), option_names())
    assert given == {"prior": "runs/p.safetensors"}
    parser = LightningArgumentParser()
    parser.add_class_arguments(TunerOptions, "tuner")
    assert parser.parse_args(["--tuner.prior", "p.safetensors"]).tuner.prior == "p.safetensors"
    assert parser.parse_args([]).tuner.prior is None
    assert tuner_arguments({"prior": "p.safetensors"}) == {"prior": "p.safetensors"}


def test_a_recipe_prior_is_taken_from_the_recipe_folder_and_a_flag_from_the_current_one(
    make_recipe, tmp_path, monkeypatch
):
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = folder / "r.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(tuner={"prior": "priors/p.safetensors"})))
    elsewhere = tmp_path / "shell"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Recipe.from_yaml(recipe).tuner["prior"] == str(folder / "priors/p.safetensors")
    assert Recipe.from_yaml(recipe, {"prior": "mine.safetensors"}).tuner["prior"] == str(elsewhere / "mine.safetensors")
    assert Recipe.from_yaml(recipe, {"prior": "/abs/p.safetensors"}).tuner["prior"] == "/abs/p.safetensors"
    monkeypatch.setenv("LIGHTNING_FMS_CACHE", str(tmp_path / "cache"))
    recipe.write_text(yaml.safe_dump(make_recipe(tuner={"prior": "{cache}/priors/p.safetensors"})))
    assert Recipe.from_yaml(recipe).tuner["prior"] == str(tmp_path / "cache/priors/p.safetensors")
    recipe.write_text(yaml.safe_dump(make_recipe(tuner={"prior": 3})))
    with pytest.raises(FMSError, match="prior must be a string or null, got 3"):
        Recipe.from_yaml(recipe)


# ------------------------------------------------------------------------------------------------ lightning-fms tune
@pytest.fixture(scope="module")
def finished_study(write_recipe, tmp_path_factory) -> tuple[Path, Path]:
    """``(recipe, study_dir)``: a study of 2 epochs, run without a prior."""
    folder = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(folder / "r.yaml", budget=2)
    Recipe.from_yaml(recipe).build_tuner(folder / "study", progress=False).run()
    return recipe, folder / "study"


def test_a_refused_prior_leaves_every_file_of_the_study_as_it_was(finished_study, make_prior, tmp_path, capsys):
    recipe, study = finished_study
    before = snapshot(study)
    assert "state.pt" in before and "results.json" in before
    not_a_prior = tmp_path / "bytes.safetensors"
    not_a_prior.write_bytes(b"\x80\x04 not a prior")
    tune = ["tune", "--config", str(recipe), "--study_dir", str(study), "--no-progress", "--prior"]
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_fms.cli", *tune, str(not_a_prior)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert f"prior {not_a_prior} is not a safetensors file" in one_line_error(proc.stderr)
    assert snapshot(study) == before  # byte for byte, the lock file included: refused before the study is opened

    other_space = SearchSpace.from_dict(
        {"hub": {"type": "hub", "choices": ["a"]}, "model.wd": {"type": "float", "low": 0.0, "high": 0.1}}
    )
    misfit = save_prior(make_prior(for_space=other_space), tmp_path / "misfit.safetensors")
    assert main([*tune, str(misfit)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert (
        f"prior {misfit} was learned for another search space: the study lacks the prior's parameter 'model.wd'" in line
    )
    assert "the study's parameter 'model.lr' is not in the prior" in line
    assert snapshot(study) == before


def test_a_recipe_prior_is_refused_from_the_recipe_folder(write_recipe, make_prior, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    save_prior(make_prior(curve="none"), folder / "curveless.safetensors")
    recipe = write_recipe(folder / "r.yaml", tuner={"searcher": "dyhpo", "prior": "curveless.safetensors"})
    monkeypatch.chdir(tmp_path)
    code = main(["tune", "--config", str(recipe), "--study_dir", str(tmp_path / "s"), "--no-progress"])
    assert code == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"prior {folder / 'curveless.safetensors'} was learned for curve input 'none'; this study uses 'cnn'" in line
    assert not (tmp_path / "s").exists()


def test_a_study_with_a_prior_keeps_it(finished_study, write_recipe, make_prior, tmp_path):
    """Resuming a study with another prior, or with one where it had none, is refused and changes nothing."""
    recipe, study = finished_study
    prior = save_prior(make_prior(), tmp_path / "p.safetensors")
    before = snapshot(study, skip=(".lock",))  # the lock file holds the pid of the last process that opened it
    tuner = Recipe.from_yaml(recipe, {"prior": str(prior)}).build_tuner(study, progress=False)
    with pytest.raises(FMSError, match="holds a study run without a prior"):
        tuner.run()
    assert snapshot(study, skip=(".lock",)) == before

    with_prior = tmp_path / "with-prior"
    Recipe.from_yaml(write_recipe(tmp_path / "r.yaml", budget=2), {"prior": str(prior)}).build_tuner(
        with_prior, progress=False
    ).run()
    state = torch.load(with_prior / "state.pt", weights_only=True)
    assert state["settings"]["prior"] == make_prior().fingerprint
    assert json.loads((with_prior / "study.json").read_text())["settings"]["prior"] == make_prior().fingerprint
    with pytest.raises(FMSError, match="holds a study run with a prior"):
        Recipe.from_yaml(tmp_path / "r.yaml").build_tuner(with_prior, progress=False).run()


# ------------------------------------------------------------------------------------------------ FMSLightningCLI
def test_tuner_prior_reaches_the_check_through_the_lightning_cli(make_cli, make_prior, tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    dyhpo_prior = save_prior(make_prior(), tmp_path / "dyhpo.safetensors")
    for prior, fragment in [
        (missing, f"prior {missing} does not exist"),
        (dyhpo_prior, f"prior {dyhpo_prior} was learned for searcher 'dyhpo'; this study uses 'fms'"),
    ]:
        with pytest.raises(SystemExit) as info:
            make_cli("fit", "--config", "cfg.yaml", "--tuner", "fms", "--tuner.space", "space.yaml",
                     "--tuner.study_dir", str(tmp_path / "s"), "--tuner.prior", str(prior))  # fmt: skip
        assert info.value.code == 2
        assert fragment in one_line_error(capsys.readouterr().err)
        assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------ lightning-fms agent
def test_the_agent_takes_a_prior_and_refuses_one_that_does_not_fit(make_prior, tmp_path, monkeypatch):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"model.lr": {"type": "float", "low": 0.01, "high": 0.1}}))
    hub_prior = save_prior(make_prior(), tmp_path / "hub.safetensors")
    monkeypatch.chdir(tmp_path)
    settings = AgentSettings(space_file=str(space_file), budget=2, monitor="val_acc", searcher="dyhpo")
    agent = StudyAgent(tmp_path / "s", ["true"], AgentSettings(**{**vars(settings), "prior": "hub.safetensors"}))
    assert agent.settings.prior == str(tmp_path / "hub.safetensors")  # stored absolute, for agents elsewhere
    with pytest.raises(PriorError, match="was learned with a hub choice \\('hub'\\); this space has none"):
        agent.run()
    assert not (tmp_path / "s/state.pt").exists()

    StudyAgent(tmp_path / "s", ["true"], settings)._load()  # a study without a prior
    joiner = StudyAgent(tmp_path / "s", ["true"], AgentSettings(prior=str(hub_prior)))
    with pytest.raises(FMSError, match="has prior=None, not"):
        joiner._load()


# ------------------------------------------------------------------------------------------------ pretrain
def test_pretrain_flags_come_from_its_declaration(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--from", "--out", "--no-progress", "--searcher", "--weights", "--curve", "--steps", "--batch_rows",
                 "--trunk_steps", "--validation_task", "--seed", "--cache_dir"):  # fmt: skip
        assert flag in help_text, flag
    args = _parser("pretrain").parse_args(["pretrain", "--from", "a", "b", "--out", "p.safetensors", "--steps", "5"])
    assert args.sources == ["a", "b"] and args.out == "p.safetensors"


def test_pretrain_refuses_bad_input_in_one_line_before_it_reads_anything(tmp_path, capsys):
    """Checked by the command itself: none of these reach ``pretrain`` (which would raise NotImplementedError)."""
    (tmp_path / "study").mkdir()
    cases = [
        (["--from", str(tmp_path / "study"), str(tmp_path / "gone"), "--out", str(tmp_path / "p.safetensors")],
         f"pretraining source {tmp_path / 'gone'} does not exist"),
        (["--from", str(tmp_path / "study"), "--out", str(tmp_path)], f"--out {tmp_path} is a directory"),
        (["--from", str(tmp_path / "study"), "--out", "p.safetensors", "--steps", "0"], "steps must be >= 1, got 0"),
    ]  # fmt: skip
    for argv, fragment in cases:
        assert main(["pretrain", *argv]) == 2
        assert fragment in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "p.safetensors").exists()


def test_pretrain_refusal_through_the_console_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_fms.cli", "pretrain", "--from", str(tmp_path / "missing"), "--out",
         str(tmp_path / "p.safetensors"), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        one_line_error(proc.stderr) == f"lightning-fms: error: pretraining source {tmp_path / 'missing'} does not exist"
    )


def test_a_prior_in_memory_is_not_touched_by_a_refusal(make_prior, recipe_space):
    prior = make_prior()
    fingerprint = prior.fingerprint
    with pytest.raises(PriorError):
        build_searcher("dyhpo", recipe_space, cap=3, device="cpu", curve="none", prior=prior)
    assert isinstance(prior, Prior) and prior.fingerprint == fingerprint and prior.path is None
