"""The runnable examples of docs/: each recipe runs with a tiny budget, as the docs show it."""

import importlib.util
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_WANDB = importlib.util.find_spec("wandb") is not None


def _wandb_env(tmp_path) -> dict:
    home = tmp_path / "wandb-home"
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(home / "runs"),
            "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data"),
            "WANDB_CONFIG_DIR": str(home / "config")}  # fmt: skip


def _hub_dir(hub) -> Path:
    return Path(hub.entry(hub.names[0]).weights).parent


def test_python_api_recipe(hub, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("python_api_recipe", ROOT / "recipes" / "python_api.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = ["--study_dir", str(tmp_path / "api"), "--budget", "3", "--max_epochs_per_trial", "2",
            "--hub_dir", str(_hub_dir(hub))]  # fmt: skip
    if HAS_WANDB:
        for key, value in _wandb_env(tmp_path).items():
            monkeypatch.setenv(key, value)
        args += ["--wandb_project", "fms-recipes", "--wandb_mode", "offline"]
    out = recipe.main(args)
    assert out["result"].epochs_spent == 3 and out["weights"]
    assert json.loads((tmp_path / "api" / "results.json").read_text())["epochs_spent"] == 3
    if HAS_WANDB:
        assert len(list((tmp_path / "wandb-home" / "runs" / "wandb").glob("offline-run-*"))) >= 2


def test_cli_recipe_as_documented(hub, tmp_path, monkeypatch, capsys):
    """recipes/cli: make_weights.py, then train.py with the W&B sweep file (W&B logging: tests/loggers/).

    Both scripts run in this process as ``python SCRIPT ...`` runs them: as ``__main__``, their folder first on
    ``sys.path``, ``sys.argv`` the command line, in the recipe's folder; what they import afresh is dropped after.
    """
    work = tmp_path / "cli"
    shutil.copytree(ROOT / "recipes" / "cli", work, ignore=shutil.ignore_patterns("weights", "__pycache__", "runs"))
    cache = tmp_path / "cache"
    (cache / "hubs").mkdir(parents=True)
    (cache / "hubs" / "tiny").symlink_to(_hub_dir(hub))  # make_weights.py reuses the session's pretrained hub

    def python(script: str, *args: str) -> None:
        with monkeypatch.context() as patch:
            for key, value in {"LIGHTNING_FMS_CACHE": str(cache), **_wandb_env(tmp_path)}.items():
                patch.setenv(key, value)
            patch.chdir(work)
            patch.syspath_prepend(str(work))
            patch.setattr(sys, "argv", [script, *args])
            patch.setitem(sys.modules, "digits", None)  # restored (or removed) when the script is done
            del sys.modules["digits"]  # the recipe's own digits.py, imported afresh
            runpy.run_path(str(work / script), run_name="__main__")

    python("make_weights.py")
    assert sorted(p.name for p in (work / "weights").iterdir()) == [
        "cnn-s.safetensors", "mlp-s.safetensors", "resnet-xs.safetensors"]  # fmt: skip
    capsys.readouterr()
    python("train.py", "fit", "--config", "cfg.yaml", "--tuner", "fms", "--tuner.space", "sweep.yaml",
           "--tuner.hub_key", "model.pretrained", "--tuner.budget", "3", "--tuner.max_epochs_per_trial", "2",
           "--tuner.study_dir", "runs/s2", "--tuner.progress", "false",
           "--tuner.surrogate_options", "{full_fit_steps: 60, refine_steps: 10, full_fits: 2}")  # fmt: skip
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{") :])
    assert summary["epochs_spent"] == 3
    assert summary["best_config"]["model.pretrained"].startswith("weights/")
    assert (work / "runs" / "s2" / "trials" / "0000" / "config.yaml").exists()


def test_callback_doc_example_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "docs" / "callback.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[-1]
    assert "optimizer.ask()" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/callback.md", "exec"), {"__name__": "__main__"})
    assert re.search(r"best val_acc \d\.\d{3}: trial \d+ epoch [12]", capsys.readouterr().out)


@pytest.mark.parametrize("page", ["cli.md", "python_api.md", "wandb.md", "callback.md"])
def test_docs_pages_link_to_existing_recipes(page):
    text = (ROOT / "docs" / page).read_text()
    for target in re.findall(r"\]\((\.\./recipes/[^)#]+)\)", text):
        assert (ROOT / "docs" / target).resolve().exists(), target


@pytest.mark.slow  # real processes end to end (tens of seconds); make test-slow, run by CI
def test_agent_recipe_as_documented(tmp_path):
    """recipes/agent: the documented `lightning-fms agent ... -- python recipes/agent/finetune.py`, tiny budget."""
    study = tmp_path / "agent-study"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_fms.cli", "agent", "--study_dir", str(study),
         "--space", str(ROOT / "recipes/agent/space.yaml"), "--budget", "4", "--monitor", "val_acc",
         "--mode", "max", "--max_epochs_per_trial", "2", "--seed", "0", "--quiet",
         "--", sys.executable, str(ROOT / "recipes/agent/finetune.py"), "--max_epochs", "2"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((study / "results.json").read_text())
    assert results["epochs_spent"] == 4
    assert results["best"]["value"] > 0.2
    assert all(t["error"] is None for t in results["trials"])


def test_agent_hub_recipe_fits_together(hub, tmp_path, monkeypatch):
    """recipes/agent's hub example: make_hub's hub builds the networks recipes/cli's script loads from the files,
    and an agent creates the study of hub_space.yaml with it (summary features; each entry's W_0 kept)."""
    from lightning_fms.agent import AgentSettings, StudyAgent
    from lightning_fms.hub import ModelHub
    from lightning_fms.testing.executors import assert_same_tensors

    monkeypatch.setattr(sys, "path", list(sys.path))  # make_hub puts recipes/cli on it to import digits
    monkeypatch.delitem(sys.modules, "digits", raising=False)
    spec = importlib.util.spec_from_file_location("agent_make_hub", ROOT / "recipes" / "agent" / "make_hub.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    hub_file = recipe.make_hub(tmp_path / "hub", hub_dir=_hub_dir(hub))
    from digits import load_backbone

    agent_hub = ModelHub.from_yaml(hub_file)
    assert agent_hub.names == ["mlp-s", "cnn-s", "resnet-xs"]
    for entry in agent_hub:
        assert_same_tensors(agent_hub.build(entry.name).state_dict(), load_backbone(str(entry.weights)).state_dict())
    settings = AgentSettings(space_file=str(ROOT / "recipes/agent/hub_space.yaml"), hub=str(hub_file), budget=30,
                             max_epochs_per_trial=10)  # fmt: skip
    agent = StudyAgent(tmp_path / "s", [sys.executable, "recipes/cli/train.py"], settings)
    agent.study.path.mkdir()
    optimizer, ledger = agent._load()
    assert optimizer.searcher.uses_weights and ledger.snapshots is not None and ledger.settings["weights"] == "auto"
    kept = sorted(p.name for p in (tmp_path / "s" / "weights").iterdir())
    assert kept == sorted(f"hub-{name}.safetensors" for name in agent_hub.names)
    sys.modules.pop("digits", None)


def _bench_surrogate(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_surrogate", ROOT / "recipes" / "bench_surrogate.py")
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, recipe)  # its dataclasses look their module up
    spec.loader.exec_module(recipe)
    return recipe


def test_bench_surrogate_steady_decisions_follow_the_fit_schedule(hub, monkeypatch):
    """recipes/bench_surrogate.py --steady: each timed decision is a fresh fit, a warm start or a promotion."""
    torch.set_num_threads(1)
    bench = _bench_surrogate(monkeypatch)
    assert bench.parse_variant("fms+summary/nocap") == bench.Variant("fms", "summary", None)
    assert bench.parse_variant("fms/nocap").label == "fms/nocap"
    with pytest.raises(SystemExit, match="unknown searcher"):
        bench.parse_variant("tpe")
    runs = bench.interleaved_runs([5, 10], [bench.Variant("gp"), bench.Variant("fms"), bench.Variant("fms", "summary"),
                                            bench.Variant("fms", max_rows=None)], repeats=2, decisions=5, cap=4,
                                  fresh=4, device="cpu", hub=hub, uncapped_decisions=2)  # fmt: skip
    assert sorted(runs) == sorted([(label, n) for label in ("gp", "fms", "fms+summary") for n in (5, 10)]
                                  + [("fms/nocap", 10)])  # fmt: skip
    assert all(len(group) == 2 for key, group in runs.items() if key[0] != "fms/nocap")
    assert [len(run.decision_s) for run in runs["fms/nocap", 10]] == [2]
    for (label, _), group in runs.items():
        for run in group:
            assert run.full_fits + run.refine_fits + run.promotions == len(run.decision_s)
            assert all(s > 0 for s in run.decision_s) and run.first_s > 0
            if label == "gp":  # the plain GP refits from scratch and never promotes
                assert (run.full_fits, run.refine_fits, run.promotions) == (5, 0, 0)
    fms_runs = runs["fms", 5] + runs["fms", 10]
    assert sum(r.refine_fits for r in fms_runs) > sum(r.full_fits for r in fms_runs)  # warm starts in between
    ratios = {what: ratio for what, ratio, _ in bench.cost_ratios(runs)}
    assert set(ratios) == {"fms / gp at 5 observations", "fms at 10 / fms at 5", "fms+summary / fms at 5",
                           "fms+summary / fms at 10", "fms/nocap / fms at 10"}  # fmt: skip
    assert all(ratio > 0 for ratio in ratios.values())
    table = bench.steady_table(runs)
    assert table[0].startswith("| searcher | observations |") and len(table) == 2 + len(runs)
