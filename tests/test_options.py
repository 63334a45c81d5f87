"""The tuner's options are declared once (lightning_fms.options) and every front end is generated from it."""

import argparse
import dataclasses
import inspect
import json
import re
import subprocess
import sys
import types
import typing

import pytest
import yaml
from lightning.pytorch.cli import LightningArgumentParser

from lightning_fms.agent import AGENT_OPTIONS, AgentSettings
from lightning_fms.cli import _parser
from lightning_fms.errors import FMSError
from lightning_fms.options import (
    FALLBACK_MODE,
    OPTION_GROUPS,
    RayOptions,
    StudyOptions,
    TunerOptions,
    add_option_flags,
    check_option,
    declared_default,
    flag_values,
    option,
    option_names,
    options_dataclass,
    recipe_option_names,
    tuner_arguments,
)
from lightning_fms.recipe import RECIPE_KEYS, TUNER_KEYS, Recipe
from lightning_fms.search.searcher import CURVE_ENCODERS, SEARCHERS, build_searcher
from lightning_fms.search.space import SearchSpace
from lightning_fms.tuner import FMSTuner
from lightning_fms.weights.registry import FEATURIZERS


def sample_text(declaration, name: str) -> str:
    """A valid command-line value for any declared option, found from its type (so new fields need no edit here)."""
    hint = typing.get_type_hints(declaration)[name]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [a for a in (typing.get_args(hint) if union else (hint,)) if a is not type(None)]
    kind = kinds[0]
    if typing.get_origin(kind) is typing.Literal:
        return str(typing.get_args(kind)[-1])
    if kind is bool:
        return "true"
    if kind is int:
        return "3"
    if kind is float:
        return "0.5"
    if typing.get_origin(kind) is dict:
        return "{steps: 5}"
    return "cuda" if kind is str else "true"


def subcommand_help(command: str, capsys) -> str:
    """``lightning-fms COMMAND --help``, as printed."""
    with pytest.raises(SystemExit):
        _parser(command).parse_args([command, "--help"])
    return capsys.readouterr().out


def tuner_group_options(declaration=TunerOptions) -> set[str]:
    """The ``--tuner.*`` options a LightningCLI parser gets from a declaration, as FMSLightningCLI adds them."""
    parser = LightningArgumentParser()
    parser.add_class_arguments(declaration, "tuner")
    return set(re.findall(r"--tuner\.[\w.]+", parser.format_help()))


def test_every_option_is_a_recipe_key_a_tune_flag_a_tuner_option_and_an_fmstuner_argument():
    names = option_names()
    assert set(recipe_option_names(top_level=True)) <= RECIPE_KEYS
    assert set(recipe_option_names(top_level=False)) == TUNER_KEYS
    assert set(names) == (RECIPE_KEYS - {"hub", "hub_builder", "model", "data", "space", "tuner", "trainer",
                                         "hub_argument", "epochs_argument"}) | TUNER_KEYS  # fmt: skip

    argv = ["tune", "--config", "r.yaml", "--study_dir", "s"]
    for name in names:
        if name in OPTION_GROUPS:  # a group's options are flags of their own: --ray.workers 3
            for sub in option_names(OPTION_GROUPS[name]):
                argv += [f"--{name}.{sub}", sample_text(OPTION_GROUPS[name], sub)]
        else:
            argv += [f"--{name}", sample_text(StudyOptions, name)]
    given = flag_values(_parser("tune").parse_args(argv), names)
    assert set(given) == set(names)
    assert set(given["ray"]) == set(option_names(RayOptions))

    groups = {f"--tuner.{name}.{sub}" for name, group in OPTION_GROUPS.items() for sub in option_names(group)}
    assert {f"--tuner.{name}" for name in names if name not in OPTION_GROUPS} | groups <= tuner_group_options()

    tuner_parameters = inspect.signature(FMSTuner).parameters
    assert set(tuner_arguments(StudyOptions())) <= set(tuner_parameters)
    assert set(names) - set(tuner_arguments(StudyOptions())) == {"weights_attribute", "ray"}  # the executor's
    for name in tuner_arguments(StudyOptions()):  # FMSTuner's defaults are the declaration's (read from it)
        default = tuner_parameters[name].default
        if name == "mode":
            assert declared_default(name) is None and default == FALLBACK_MODE  # no space file to read a goal from
        elif default is not inspect.Parameter.empty:  # budget and monitor are required
            assert default == declared_default(name), name


CHANGED_DECLARATION = """
import inspect, json
import lightning_fms.options as options

@options.options_dataclass
class Changed(options.StudyOptions):
    \"\"\"The declaration with other defaults.\"\"\"

    num_fresh_candidates: int = options.option(7, "Fresh configurations scored per decision.")
    curve: options.CurveEncoderName = options.option("none", "Learning-curve encoder.")

options.StudyOptions = Changed  # before lightning_fms.tuner reads it
from lightning_fms.tuner import FMSTuner

parameters = inspect.signature(FMSTuner).parameters
print(json.dumps({name: parameters[name].default for name in ("num_fresh_candidates", "curve", "searcher")}))
"""


def test_fmstuner_takes_its_defaults_from_the_declaration():
    done = subprocess.run([sys.executable, "-c", CHANGED_DECLARATION], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "num_fresh_candidates": 7,
        "curve": "none",
        "searcher": declared_default("searcher"),
    }


def test_a_field_added_to_the_declaration_reaches_every_front_end():
    @options_dataclass
    class WithPatience(StudyOptions):
        """Study options with one more."""

        patience: int = option(3, "Epochs without improvement before a trial is stopped.", minimum=1)

    assert "patience" in recipe_option_names(WithPatience, top_level=False)
    assert check_option("patience", 4, WithPatience) == 4
    with pytest.raises(FMSError, match="patience must be >= 1, got 0"):
        check_option("patience", 0, WithPatience)
    with pytest.raises(FMSError, match="patience must be an integer, got 'soon'"):
        check_option("patience", "soon", WithPatience)

    parser = argparse.ArgumentParser()
    add_option_flags(parser, option_names(WithPatience), WithPatience)
    assert "Epochs without improvement" in parser.format_help()
    assert flag_values(parser.parse_args(["--patience", "5"]), option_names(WithPatience), WithPatience) == {
        "patience": 5
    }
    assert tuner_arguments(WithPatience(patience=6), WithPatience)["patience"] == 6
    assert "patience: Epochs without improvement" in WithPatience.__doc__

    @options_dataclass
    class TunerWithPatience(TunerOptions):
        """The CLI's options with one more."""

        patience: int = option(3, "Epochs without improvement before a trial is stopped.")

    assert "--tuner.patience" in tuner_group_options(TunerWithPatience)
    parser = LightningArgumentParser()
    parser.add_class_arguments(TunerWithPatience, "tuner")
    assert parser.parse_args(["--tuner.patience", "7"]).tuner.patience == 7


def test_choices_come_from_the_registries(capsys):
    hints = typing.get_type_hints(StudyOptions)
    assert typing.get_args(hints["searcher"]) == SEARCHERS
    assert typing.get_args(hints["curve"]) == CURVE_ENCODERS
    assert typing.get_args(hints["weights"]) == ("auto", "none", *FEATURIZERS)
    tune_help = subcommand_help("tune", capsys)
    weights = ("auto", "none", *FEATURIZERS)
    assert "{" + ",".join(SEARCHERS) + "}" in tune_help and "{" + ",".join(weights) + "}" in tune_help
    space = SearchSpace.from_dict({"model.lr": {"type": "float", "low": 0.01, "high": 0.1}})
    for name in SEARCHERS:  # every listed name builds
        assert build_searcher(name, space, cap=3, device="cpu") is not None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("searcher", "bogus", "unknown searcher 'bogus' (expected one of fms, dyhpo, gp, random)"),
        ("weights", "pixels", "unknown weights 'pixels' (expected one of auto, none, gmn, nfn, flat, stats, summary)"),
        ("budget", True, "budget must be an integer, got True"),
        ("budget", 0, "budget must be >= 1, got 0"),
        ("seed", -1, "seed must be >= 0, got -1"),
        ("monitor", "", "monitor must be a non-empty string"),
        ("device", 3, "device must be a string or null, got 3"),
        ("surrogate_options", [1], "surrogate_options must be a mapping or null"),
        ("frozen_layers", "half", "frozen_layers must be true or false or a list of numbers or null"),
        ("colour", "blue", "unknown option 'colour'"),
    ],
)
def test_check_option_refuses_in_one_line(name, value, message):
    with pytest.raises(FMSError) as error:
        check_option(name, value)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_check_option_leaves_ranges_to_their_owner():
    assert check_option("frozen_layers", [0.5, 2.0]) == [0.5, 2.0]  # the tuner names the bad fraction
    assert check_option("frozen_layers", [1]) == [1] and check_option("frozen_layers", True) is True
    assert check_option("max_paused_trials", None) is None


def test_flag_values_parse_each_kind_and_name_the_flag():
    names = option_names()
    parse = _parser("tune").parse_args
    base = ["tune", "--config", "r.yaml", "--study_dir", "s"]
    assert flag_values(parse(base), names) == {}
    given = flag_values(
        parse([*base, "--frozen_layers", "0.25,0.5", "--surrogate_options", "{full_fit_steps: 60}", "--budget", "4"]),
        names,
    )
    assert given == {"frozen_layers": [0.25, 0.5], "surrogate_options": {"full_fit_steps": 60}, "budget": 4}
    assert flag_values(parse([*base, "--frozen_layers", "TRUE"]), names) == {"frozen_layers": True}
    for flag, text, message in [
        ("--frozen_layers", "0.5,half", "--frozen_layers must be true, false or fractions like 0.25,0.5, got"),
        ("--surrogate_options", "[1, 2]", "--surrogate_options must be a mapping like '{steps: 50}', got '[1, 2]'"),
        ("--budget", "0", "budget must be >= 1, got 0"),
    ]:
        with pytest.raises(FMSError, match=message.replace("[", r"\[").replace("{", r"\{")):
            flag_values(parse([*base, flag, text]), names)
    with pytest.raises(SystemExit):  # not a choice: argparse's own message
        parse([*base, "--searcher", "bogus"])


def test_recipe_overrides_go_to_their_section(tmp_path):
    recipe = {
        "model": "lightning_fms.zoo.ImageClassifier",
        "data": "lightning_fms.zoo.DigitsDataModule",
        "space": {"model.lr": {"type": "float", "low": 0.01, "high": 0.1}},
        "monitor": "val_acc",
        "tuner": {"searcher": "dyhpo", "num_fresh_candidates": 8},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = Recipe.from_yaml(path, {"budget": 4, "searcher": "gp", "curve": None, "frozen_layers": [0.5]})
    assert loaded.budget == 4 and loaded.mode == "max" and loaded.max_epochs_per_trial == 20
    assert loaded.tuner == {"searcher": "gp", "num_fresh_candidates": 8, "frozen_layers": [0.5]}
    with pytest.raises(FMSError, match="num_startup_trials must be an integer, got 'two'"):
        Recipe.from_yaml(path, {"num_startup_trials": "two"})
    with pytest.raises(FMSError, match=r"unknown tuner option\(s\) \['patience'\]"):
        Recipe.from_dict({**recipe, "tuner": {"patience": 3}})
    with pytest.raises(FMSError, match="'tuner' must be a mapping"):
        Recipe.from_dict({**recipe, "tuner": ["searcher"]})


def test_agent_flags_are_the_declared_options_it_takes(capsys):
    assert set(AGENT_OPTIONS) <= set(option_names())
    assert [f.name for f in dataclasses.fields(AgentSettings)] == ["space_file", "hub", *AGENT_OPTIONS]
    # every study option but those an agent cannot take (frozen layers; the surrogate's device is the CPU; the
    # epochs run in the user's command, not on Ray)
    assert set(option_names()) - set(AGENT_OPTIONS) == {"frozen_layers", "device", "ray"}
    argv = ["agent", "--study_dir", "s", "--space", "space.yaml", "--budget", "7", "--searcher", "random",
            "--weights", "gmn", "--surrogate_options", "{full_fits: 2}"]  # fmt: skip
    settings = AgentSettings(space_file="space.yaml", **flag_values(_parser("agent").parse_args(argv), AGENT_OPTIONS))
    assert settings == AgentSettings(
        space_file="space.yaml", budget=7, searcher="random", weights="gmn", surrogate_options={"full_fits": 2}
    )
    help_text = subcommand_help("agent", capsys)
    assert all(f"--{name}" in help_text for name in ("hub", *AGENT_OPTIONS)) and "--frozen_layers" not in help_text
