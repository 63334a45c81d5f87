from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_fms.testing import tiny_hub


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs at one intra-op thread.

    The models are tiny, so more threads only cost hand-offs on a shared 2-core machine; and float reductions
    depend on the thread count, so results pinned bit for bit (tests/test_pinned_decisions.py) hold at one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """A tiny pretrained hub (3 families x 2 entries), built once per test session."""
    return tiny_hub(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="session")
def hub_file(hub, tmp_path_factory) -> Path:
    directory = Path(hub.entry(hub.names[0]).weights).parent
    return directory / "hub.yaml"


_FAST_SURROGATE = {"full_fit_steps": 60, "refine_steps": 10, "full_fits": 2}
"""Surrogate options that fit each decision of a tiny study in a fraction of a second."""


@pytest.fixture
def fast_surrogate() -> dict:
    """Fast surrogate options (``surrogate_options`` of FMSTuner), a fresh dict per test."""
    return dict(_FAST_SURROGATE)


@pytest.fixture(scope="session")
def make_recipe(hub_file) -> Callable[..., dict]:
    """``make_recipe(**overrides) -> dict``: a small tuner recipe over the session's tiny hub.

    The recipe tunes ImageClassifier on the digits target task (lr, momentum, batch size and the hub entry), 8
    epochs at most 3 per trial, with the fast surrogate; top-level keys given as overrides replace the defaults
    (``hub=`` another hub file, ``budget=2``, ``space={...}``).
    """

    def make(**overrides) -> dict:
        recipe = {
            "hub": str(hub_file),
            "model": {"class_path": "lightning_fms.zoo.ImageClassifier"},
            "data": {"class_path": "lightning_fms.zoo.DigitsDataModule", "init_args": {"task": "target"}},
            "space": {
                "hub": {"type": "hub"},
                "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
                "model.momentum": {"type": "float", "low": 0.0, "high": 0.9},
                "data.batch_size": {"type": "categorical", "choices": [32, 64]},
            },
            "monitor": "val_acc",
            "mode": "max",
            "budget": 8,
            "max_epochs_per_trial": 3,
            "seed": 0,
            "tuner": {"searcher": "dyhpo", "num_fresh_candidates": 16, "surrogate_options": dict(_FAST_SURROGATE)},
            "trainer": {"accelerator": "cpu", "devices": 1},
        }
        recipe.update(overrides)
        return recipe

    return make


@pytest.fixture(scope="session")
def write_recipe(make_recipe) -> Callable[..., Path]:
    """``write_recipe(path, **overrides) -> path``: :func:`make_recipe`'s recipe written to ``path`` as YAML."""

    def write(path: Path, **overrides) -> Path:
        path.write_text(yaml.safe_dump(make_recipe(**overrides)))
        return path

    return write


CLI_RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "cli"


def _cli_recipe_weights(hub, tmp_path_factory) -> Path:
    """The CLI recipe's weights files, made once per session from the session's tiny hub."""
    out = tmp_path_factory.getbasetemp() / "cli-weights"
    if not (out / "resnet-xs.safetensors").exists():
        spec = importlib.util.spec_from_file_location("recipe_digits", CLI_RECIPE_DIR / "digits.py")
        digits = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(digits)
        digits.make_weights(out, hub_dir=Path(hub.entry(hub.names[0]).weights).parent)
    return out


@pytest.fixture(scope="module")
def cli_dir(hub, tmp_path_factory):
    """A copy of recipes/cli with its weights files."""
    directory = tmp_path_factory.mktemp("cli")
    for name in ("train.py", "digits.py", "cfg.yaml", "space.yaml", "sweep.yaml"):
        shutil.copy(CLI_RECIPE_DIR / name, directory / name)
    shutil.copytree(_cli_recipe_weights(hub, tmp_path_factory), directory / "weights")
    return directory


@pytest.fixture
def in_cli_dir(cli_dir, monkeypatch):
    """Run in the copy of recipes/cli, with its ``digits`` module importable."""
    monkeypatch.chdir(cli_dir)
    monkeypatch.syspath_prepend(str(cli_dir))
    monkeypatch.setattr(sys, "argv", ["train.py"])
    return cli_dir


@pytest.fixture
def fast_tuner_flags() -> list[str]:
    """``--tuner.*`` flags of FMSLightningCLI for a quick study: no progress display, few candidates, fast surrogate."""
    return ["--tuner.progress", "false", "--tuner.num_fresh_candidates", "8",
            "--tuner.surrogate_options", json.dumps(_FAST_SURROGATE)]  # fmt: skip


@pytest.fixture
def make_cli(in_cli_dir) -> Callable[..., Any]:
    """``make_cli(*args) -> FMSLightningCLI``: recipes/cli's DigitsFineTuner on digits, in the copy of recipes/cli."""
    from digits import DigitsFineTuner

    from lightning_fms.lightning_cli import FMSLightningCLI
    from lightning_fms.zoo import DigitsDataModule

    def make(*args: str) -> FMSLightningCLI:
        return FMSLightningCLI(DigitsFineTuner, DigitsDataModule, args=list(args))

    return make
