"""Optional pieces: cheap imports, extras for matplotlib, nfn and scikit-learn, one-line install hints when missing."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_fms.errors import FMSError

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(statement: str) -> set[str]:
    """Every module ``python -X importtime -c statement`` imports."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import lightning_fms", {"jsonargparse", "wandb", "rich", "matplotlib", "torch", "lightning"}),
        ("import lightning_fms.cli", {"jsonargparse", "wandb", "rich", "matplotlib", "torch", "lightning"}),
        ("from lightning_fms.weights.registry import FEATURIZERS", {"torch_geometric", "nfn", "matplotlib"}),
        ("import lightning_fms.options", {"jsonargparse", "lightning", "torch_geometric", "matplotlib", "rich"}),
    ],
)
def test_imports_stay_cheap(statement, absent):
    top_level = {name.partition(".")[0] for name in imported_modules(statement)}
    assert not top_level & absent


def test_heavy_optional_packages_are_extras_and_make_installs_them():
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    core = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M)[1]
    installed_by_make = re.search(r'pip install --quiet -e "\.\[([\w,]+)\]"', (ROOT / "Makefile").read_text())[1]
    for package, extra in (("matplotlib", "plots"), ("nfn", "nfn"), ("scikit-learn", "demo")):
        assert f'"{package}' not in core
        assert re.search(rf'^{extra} = \["{package}>=', pyproject, re.M)
        assert extra in installed_by_make.split(",")


@pytest.mark.parametrize(
    ("blocked", "call", "hint"),
    [
        (("nfn", "nfn.common", "nfn.layers"), lambda: _featurizer("nfn"), "pip install 'lightning_fms[nfn]'"),
        (("sklearn", "sklearn.datasets"), lambda: _digits(), "pip install 'lightning_fms[demo]'"),
        (("matplotlib",), lambda: _bench(), "pip install 'lightning_fms[plots]'"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, blocked, call, hint):
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(FMSError) as error:
        call()
    assert hint in str(error.value) and "\n" not in str(error.value)


def _featurizer(name):
    from lightning_fms.weights import build_featurizer

    return build_featurizer(name)


def _digits():
    from lightning_fms.zoo.digits import load_digits_task

    return load_digits_task("target")


def _bench():
    from lightning_fms.bench.runner import PoolSource, run_bench

    # refused before any pool is loaded or any run starts
    return run_bench([PoolSource("no-such-task.yaml")], ["random"], seeds=1, budget=1, out_dir="unused")


# `lightning-fms` as it runs where matplotlib is not installed: the import fails, and so does the metadata lookup
# through which Lightning's and torchmetrics' availability checks would still find the distribution.
WITHOUT_MATPLOTLIB = """
import importlib.metadata as metadata, sys
sys.modules["matplotlib"] = None
def hide(lookup):
    def without(name, *args):
        if name == "matplotlib":
            raise metadata.PackageNotFoundError(name)
        return lookup(name, *args)
    return without
metadata.version, metadata.distribution = hide(metadata.version), hide(metadata.distribution)
from lightning_fms.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_matplotlib_the_study_runs_and_skips_regret_png_with_one_warning(write_recipe, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", budget=2)
    study = tmp_path / "s"
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB, "tune", "--config", str(recipe), "--study_dir", str(study),
         "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epochs_spent"] == 2
    assert (study / "results.json").exists() and not (study / "regret.png").exists()
    warnings = [line for line in proc.stderr.splitlines() if "regret.png" in line]
    assert len(warnings) == 1 and "pip install 'lightning_fms[plots]'" in warnings[0], proc.stderr
