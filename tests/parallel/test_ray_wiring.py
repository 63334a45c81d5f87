"""The Ray executor behind every front end: a recipe's tuner.ray block, --ray.* flags, --tuner.ray.* options."""

from __future__ import annotations

import pytest
import yaml

from lightning_fms.cli import main
from lightning_fms.errors import FMSError
from lightning_fms.options import RayOptions
from lightning_fms.parallel.ray_executor import RayExecutor
from lightning_fms.recipe import Recipe


@pytest.mark.parametrize(
    ("ray", "message"),
    [
        ({"workers": 0}, "ray.workers must be >= 1, got 0"),
        ({"workers": 1.5}, "ray.workers must be an integer or null, got 1.5"),
        ({"cpus_per_trial": -1}, "ray.cpus_per_trial must be >= 0, got -1"),
        ({"gpus_per_trial": -0.5}, "ray.gpus_per_trial must be >= 0, got -0.5"),
        ({"gpus_per_trial": 1.5}, "ray.gpus_per_trial above 1 must be a whole number of GPUs, got 1.5"),
        ({"mode": "later"}, "unknown ray.mode 'later' (expected one of async, sync)"),
        ({"address": "nowhere"}, "ray.address must be null (a local cluster), 'auto' or HOST:PORT, got 'nowhere'"),
        ({"nodes": 3}, "unknown option 'ray.nodes' (known: ray.address, ray.workers,"),
        ([2], "ray must be a mapping of its options"),
    ],
)
def test_a_bad_ray_setting_in_a_recipe_is_one_line(make_recipe, ray, message):
    recipe = make_recipe()
    with pytest.raises(FMSError) as error:
        Recipe.from_dict({**recipe, "tuner": {**recipe["tuner"], "ray": ray}})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_executor_refuses_bad_settings_before_importing_ray():
    for settings, message in [({"workers": 0}, "ray.workers"), ({"mode": "batch"}, "ray.mode")]:
        with pytest.raises(FMSError, match=message):
            RayExecutor(lambda: None, **settings)


def test_a_recipe_block_and_the_flags_make_the_ray_executor(make_recipe, tmp_path):
    recipe = make_recipe()
    recipe["tuner"]["ray"] = {"address": "127.0.0.1:1", "cpus_per_trial": 0.5}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = Recipe.from_yaml(path, {"ray": {"workers": 3, "mode": "sync"}})  # what --ray.workers 3 ... gives
    assert loaded.tuner["ray"] == RayOptions(address="127.0.0.1:1", workers=3, cpus_per_trial=0.5, mode="sync")
    tuner = loaded.build_tuner(tmp_path / "s", progress=False)  # nothing connects before the study runs
    executor = tuner.executor
    assert isinstance(executor, RayExecutor)
    assert (executor.address, executor.workers, executor.cpus_per_trial, executor.mode) == (
        "127.0.0.1:1",
        3,
        0.5,
        "sync",
    )
    assert executor.gpus_per_trial == 0.0
    empty = Recipe.from_dict({**recipe, "tuner": {"ray": {}}})  # an empty block: Ray with the defaults
    assert empty.tuner["ray"] == RayOptions()
    assert "ray" not in Recipe.from_dict({**recipe, "tuner": {"ray": None}}).tuner
    assert "ray" not in Recipe.from_dict({**recipe, "tuner": {}}).tuner


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ray.workers", "0"], "lightning-fms: error: ray.workers must be >= 1, got 0"),
        (["--ray.cpus_per_trial", "-2"], "lightning-fms: error: ray.cpus_per_trial must be >= 0, got -2.0"),
        (["--ray.address", "nowhere"], "lightning-fms: error: ray.address must be null"),
    ],
)
def test_bad_ray_flags_exit_2_with_one_line(write_recipe, tmp_path, capsys, flags, message):
    path = write_recipe(tmp_path / "recipe.yaml")
    status = main(["tune", "--config", str(path), "--study_dir", str(tmp_path / "s"), "--no-progress", *flags])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith(message) and "\n" not in err
    assert not (tmp_path / "s").exists()


def test_an_unknown_mode_flag_is_refused_by_the_parser(write_recipe, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml")
    with pytest.raises(SystemExit) as stop:
        main(["tune", "--config", str(path), "--study_dir", str(tmp_path / "s"), "--ray.mode", "later"])
    assert stop.value.code == 2


def test_bad_tuner_ray_options_exit_2_with_one_line(make_cli, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        make_cli("fit", "--config", "cfg.yaml", "--tuner", "fms", "--tuner.space", "space.yaml",
                 "--tuner.study_dir", str(tmp_path / "s"), "--tuner.ray.workers", "0")  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err == "lightning-fms: error: ray.workers must be >= 1, got 0"


# ------------------------------------------------------------------ studies through the front ends, on the cluster
def test_fms_lightning_cli_runs_a_study_on_ray(ray_cluster, make_cli, tmp_path, fast_tuner_flags):
    study = tmp_path / "s"
    cli = make_cli("fit", "--config", "cfg.yaml", "--tuner", "fms", "--tuner.space", "space.yaml",
                   "--tuner.budget", "2", "--tuner.max_epochs_per_trial", "2", "--tuner.study_dir", str(study),
                   "--tuner.max_epochs_key", "model.max_epochs", "--tuner.ray.address", ray_cluster.address,
                   "--tuner.ray.workers", "1", *fast_tuner_flags)  # fmt: skip
    assert cli.tune_result is not None and cli.tune_result.epochs_spent == 2
    assert "ray-w1@127.0.0.1" in (study / "trajectory.csv").read_text()
    assert sorted(p.name for p in (study / "trials").iterdir() if p.is_dir())  # the workers wrote the trials
