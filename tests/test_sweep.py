"""W&B sweep files and recipe-form space files read as search spaces."""

import math
from pathlib import Path

import pytest
import yaml

from lightning_fms.errors import FMSError
from lightning_fms.search.space import CategoricalParam, FloatParam, HubChoice, IntParam
from lightning_fms.sweep import SUPPORTED_DISTRIBUTIONS, read_space_file, space_from_sweep

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "cli"


def test_sweep_parameters_map_to_space_types():
    space, metric, mode = space_from_sweep(
        {
            "method": "bayes",
            "program": "train.py",
            "metric": {"name": "val_acc", "goal": "maximize"},
            "early_terminate": {"type": "hyperband", "min_iter": 3},
            "parameters": {
                "model.init_args.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 0.1},
                "model.init_args.dropout": {"min": 0.0, "max": 0.5},
                "model.init_args.layers": {"min": 1, "max": 4},
                "model.init_args.width": {"distribution": "int_uniform", "min": 8, "max": 64},
                "model.init_args.wd": {"distribution": "log_uniform", "min": -9.2, "max": -2.3},
                "model.init_args.momentum": {"distribution": "uniform", "min": 0.5, "max": 0.9},
                "data.batch_size": {"values": [16, 32, 64]},
                "data.task": {"distribution": "categorical", "values": ["target"]},
                "data.seed": {"value": 3},
                "trainer": {"parameters": {"gradient_clip_val": {"distribution": "constant", "value": 1.0}}},
            },
        }
    )
    assert (metric, mode) == ("val_acc", "max")
    assert space["model.init_args.lr"] == FloatParam(1e-4, 0.1, log=True)
    assert space["model.init_args.dropout"] == FloatParam(0.0, 0.5)
    assert space["model.init_args.layers"] == IntParam(1, 4)
    assert space["model.init_args.width"] == IntParam(8, 64)
    wd = space["model.init_args.wd"]
    assert wd.log and math.isclose(wd.low, math.exp(-9.2)) and math.isclose(wd.high, math.exp(-2.3))
    assert space["model.init_args.momentum"] == FloatParam(0.5, 0.9)
    assert space["data.batch_size"] == CategoricalParam((16, 32, 64))
    assert space["data.task"] == CategoricalParam(("target",))
    assert space["data.seed"] == CategoricalParam((3,))
    assert space["trainer.gradient_clip_val"] == CategoricalParam((1.0,))  # nested parameters are flattened
    assert space.hub_key is None


def test_metric_goal_defaults_to_minimize_as_in_wandb():
    _, metric, mode = space_from_sweep({"metric": {"name": "val_loss"}, "parameters": {"model.lr": {"values": [1]}}})
    assert (metric, mode) == ("val_loss", "min")
    _, metric, mode = space_from_sweep({"parameters": {"model.lr": {"values": [1]}}})
    assert (metric, mode) == (None, None)


@pytest.mark.parametrize(
    "spec",
    [{"distribution": "q_uniform", "min": 0, "max": 1, "q": 0.1}, {"distribution": "normal", "mu": 0, "sigma": 1}],
)
def test_unsupported_distribution_lists_the_supported_ones(spec):
    with pytest.raises(FMSError) as info:
        space_from_sweep({"parameters": {"model.lr": spec}})
    message = str(info.value)
    assert f"distribution {spec['distribution']!r} is not supported" in message
    assert all(name in message for name in SUPPORTED_DISTRIBUTIONS)
    assert "\n" not in message


@pytest.mark.parametrize(
    ("sweep", "fragment"),
    [
        ({"parameters": {}}, "needs 'parameters'"),
        ({"parameters": {"model.lr": {"min": 0.1}}}, "give 'values', 'value', or 'min' and 'max'"),
        ({"parameters": {"model.lr": {"min": 0.5, "max": 0.1}}}, "low=0.5 is above high=0.1"),
        ({"parameters": {"model.lr": {"distribution": "log_uniform_values", "min": 0.0, "max": 1}}}, "log scale"),
        ({"parameters": {"model.n": {"distribution": "int_uniform", "min": 0.5, "max": 3}}}, "integer bounds"),
        ({"parameters": {"model.lr": {"values": [], "distribution": "categorical"}}}, "non-empty list"),
        ({"parameters": {"model.lr": {"values": [1], "probabilities": [1.0]}}}, "['probabilities'] are not supported"),
        ({"parameters": {"model.lr": {"values": [1]}}, "metric": {"name": "x", "goal": "up"}}, "metric.goal"),
        ({"parameters": {"model.lr": {"values": [1]}}, "colour": 1}, "unknown sweep key(s) ['colour']"),
    ],
)
def test_malformed_sweeps_are_refused(sweep, fragment):
    with pytest.raises(FMSError, match=None) as info:
        space_from_sweep(sweep)
    assert fragment in str(info.value)


def test_read_space_file_accepts_sweep_recipe_and_bare_forms(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {"metric": {"name": "acc", "goal": "maximize"}, "parameters": {"model.lr": {"min": 0.1, "max": 0.2}}}
        )
    )
    got = read_space_file(sweep)
    assert (got.kind, got.monitor, got.mode, got.base_dir) == ("sweep", "acc", "max", tmp_path.resolve())

    wrapped = tmp_path / "space.yaml"
    spec = {"model.lr": {"type": "float", "low": 0.1, "high": 0.2}, "model.w": {"type": "hub", "choices": ["a.pt"]}}
    wrapped.write_text(yaml.safe_dump({"space": spec, "monitor": "loss", "mode": "min"}))
    got = read_space_file(wrapped)
    assert (got.kind, got.monitor, got.mode) == ("recipe", "loss", "min")
    assert isinstance(got.space["model.w"], HubChoice) and got.space.hub_key == "model.w"

    got = read_space_file(spec)  # a mapping, as given inline on the command line
    assert (got.monitor, got.mode, got.base_dir) == (None, None, None) and list(got.space) == ["model.lr", "model.w"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("a: [unclosed", "not valid YAML"),
        ("- 1\n- 2", "must be a mapping"),
        ("space: {}\ncolour: red", "unknown key(s) ['colour']"),
    ],
)
def test_bad_space_files(tmp_path, content, fragment):
    path = tmp_path / "s.yaml"
    path.write_text(content)
    with pytest.raises(FMSError) as info:
        read_space_file(path)
    assert fragment in str(info.value)
    with pytest.raises(FMSError, match="does not exist"):
        read_space_file(tmp_path / "missing.yaml")


def test_the_recipe_sweep_and_space_describe_the_same_search():
    sweep = read_space_file(RECIPE_DIR / "sweep.yaml")
    ours = read_space_file(RECIPE_DIR / "space.yaml")
    assert (sweep.monitor, sweep.mode) == (ours.monitor, ours.mode) == ("val_acc", "max")
    assert list(sweep.space) == list(ours.space)
    for name in ours.space:
        if name == ours.space.hub_key:
            assert sweep.space[name].choices == ours.space[name].choices
        else:
            assert sweep.space[name] == ours.space[name]
