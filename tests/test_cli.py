"""The command line as users meet it: exit codes, one-line errors, SIGKILL and resume.

Real processes where the process is the point (a bad recipe's one error line, exit status 2 and no traceback from a
fresh interpreter; SIGKILL and resume); ``main(argv)`` in this process for the rest, which runs the same code
without paying for an interpreter that imports torch and Lightning each time.
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_fms.hub import ModelHub


def cli_env() -> dict[str, str]:
    """The environment of a real ``lightning-fms``: unbuffered output and, as in this process, one torch thread."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def cli(*args, timeout=300, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "lightning_fms.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        cwd=cwd,
    )


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("lightning-fms: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tune(recipe, study, *extra, timeout=300):
    return cli("tune", "--config", str(recipe), "--study_dir", str(study), "--no-progress", *extra, timeout=timeout)


@pytest.fixture
def tune_here(capsys):
    """``tune_here(recipe, study, *flags) -> CompletedProcess``: ``lightning-fms tune`` through ``main`` in this process.

    The exit status is what ``main`` returns (or what ``SystemExit`` carries, for argparse's own errors); stdout and
    stderr are what it printed.
    """
    from lightning_fms.cli import main

    def run(recipe, study, *extra) -> subprocess.CompletedProcess:
        argv = ["tune", "--config", str(recipe), "--study_dir", str(study), "--no-progress", *extra]
        capsys.readouterr()  # only what this command prints
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)

    return run


def test_tune_runs_and_prints_the_best(write_recipe, tmp_path, tune_here):
    recipe = write_recipe(tmp_path / "r.yaml", budget=5)
    proc = tune_here(recipe, tmp_path / "s", "--seed", "1", "--budget", "4")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["epochs_spent"] == 4
    results = json.loads((tmp_path / "s/results.json").read_text())
    assert results["seed"] == 1 and results["budget"] == 4


def test_a_bad_recipe_gets_one_line_and_exit_2_from_the_real_process(make_recipe, tmp_path):
    """The real ``lightning-fms tune``: one error line, exit status 2, no traceback, nothing recorded.

    The metric is found missing only after the first epoch trained, so the whole way through the tuner, its
    Trainer and the CLI's error handling runs in a fresh interpreter here; the other bad inputs run in this process.
    """
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(make_recipe(monitor="val_nope")))
    proc = tune(path, tmp_path / "s")
    assert_one_line_error(proc, "'val_nope' was never logged")
    assert not (tmp_path / "s/state.pt").exists()


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (lambda r: r.update(budget=0), ["budget must be >= 1"]),
        (
            lambda r: r["space"].update({"model.lr": {"type": "float", "low": 0.5, "high": 0.1}}),
            ["low=0.5 is above high=0.1"],
        ),
        (
            lambda r: r["space"].update({"model.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}),
            ["log scale needs low > 0"],
        ),
        (
            lambda r: r["space"].update({"hub": {"type": "hub", "choices": ["mlp-s", "nope"]}}),
            ["unknown hub entry 'nope'"],
        ),
        (
            lambda r: r["space"].update({"model.not_an_arg": {"type": "float", "low": 0, "high": 1}}),
            ["no argument 'not_an_arg'"],
        ),
        (lambda r: r.update(colour="blue"), ["unknown recipe key(s) ['colour']"]),
        (lambda r: r["tuner"].update(searcher="bogus"), ["unknown searcher 'bogus'"]),
        (lambda r: r["tuner"].update(frozen_layers=[0.5, 2.0]), ["frozen_layers fractions must be numbers in (0, 1]"]),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(make_recipe, tmp_path, tune_here, mutate, fragments):
    recipe = make_recipe()
    mutate(recipe)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = tune_here(path, tmp_path / "s")
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "s/state.pt").exists()


def test_frozen_layers_flag(write_recipe, tmp_path, tune_here):
    recipe = write_recipe(tmp_path / "r.yaml", budget=2)
    proc = tune_here(recipe, tmp_path / "bad", "--frozen_layers", "0.5,half")
    assert_one_line_error(proc, "--frozen_layers must be true, false or fractions")
    proc = tune_here(recipe, tmp_path / "s", "--frozen_layers", "0.3")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "s/results.json").read_text())
    # the cheap startup epochs at fraction 0.3 are charged less than a full epoch each
    assert results["budget_spent"] <= 2.0 + 1e-9 and results["epochs_spent"] > 2


def test_malformed_yaml(tmp_path, tune_here):
    path = tmp_path / "r.yaml"
    path.write_text("model: [unclosed\nspace: {")
    assert_one_line_error(tune_here(path, tmp_path / "s"), "not valid YAML")


def test_budget_flag_below_one(write_recipe, tmp_path, tune_here):
    recipe = write_recipe(tmp_path / "r.yaml")
    assert_one_line_error(tune_here(recipe, tmp_path / "s", "--budget", "0"), "budget must be >= 1")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_hub_file_with_pickled_code_is_refused_not_run(hub, tmp_path, write_recipe, tune_here, monkeypatch):
    entries = list(hub)
    evil = tmp_path / "evil.pt"
    torch.save({"weight": _Evil()}, evil)
    entries[0] = dataclasses.replace(entries[0], weights=evil, sha256=None)
    ModelHub(entries, name="evil").to_yaml(tmp_path / "hub.yaml")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        hub=str(tmp_path / "hub.yaml"),
        space={"hub": {"type": "hub", "choices": [entries[0].name]}},
    )
    monkeypatch.chdir(tmp_path)  # where the payload would leave its file
    assert_one_line_error(tune_here(recipe, tmp_path / "s"), "pickled code")
    assert not (tmp_path / "PWNED").exists()


def test_locked_study_is_refused(write_recipe, tmp_path, tune_here):
    from lightning_fms.study.directory import StudyDirectory

    recipe = write_recipe(tmp_path / "r.yaml")
    with StudyDirectory(tmp_path / "s"):
        assert_one_line_error(tune_here(recipe, tmp_path / "s"), "in use by another tuner")


def _epochs_recorded(study: Path) -> int:
    try:
        return json.loads((study / "study.json").read_text())["epochs_spent"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.slow  # real processes end to end (tens of seconds); make test-slow, run by CI
def test_sigkill_then_rerun_resumes_with_the_same_decisions(write_recipe, tmp_path, tune_here):
    # the uninterrupted reference runs in this process, the killed and resumed runs in real processes, all at one
    # torch thread (the one_thread fixture, cli_env), so that their float reductions agree
    recipe = write_recipe(tmp_path / "r.yaml", budget=10)
    reference = tune_here(recipe, tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr

    study = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "lightning_fms.cli",
        "tune",
        "--config",
        str(recipe),
        "--study_dir",
        str(study),
        "--no-progress",
    ]
    kills = 0
    for target in (3, 6):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
        deadline = time.time() + 240
        while _epochs_recorded(study) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # land somewhere inside the next epoch
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    assert _epochs_recorded(study) < 10
    finish = tune(recipe, study)
    assert finish.returncode == 0, finish.stderr
    assert json.loads(finish.stdout)["epochs_spent"] == 10  # the real process prints the summary, and only that

    ref = json.loads((tmp_path / "ref/study.json").read_text())
    got = json.loads((study / "study.json").read_text())
    assert got["epochs_spent"] == ref["epochs_spent"] == 10
    key = lambda d: (d["decision"], d["kind"], d["trial"], d["epoch"], d["value"])  # noqa: E731
    assert [key(d) for d in got["decisions"]] == [key(d) for d in ref["decisions"]]
    assert [t["config"] for t in got["trials"]] == [t["config"] for t in ref["trials"]]


ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = [ROOT / "README.md", ROOT / "Makefile", *sorted(ROOT.glob("docs/*.md")), *sorted(ROOT.glob("recipes/**/*.py")),
              *sorted(ROOT.glob("recipes/**/*.yaml"))]  # fmt: skip


def documented_command_lines(prefix: str) -> list[tuple[str, list[str]]]:
    """Every documented ``PREFIX ...`` in the docs, README, Makefile and recipes: (where, tokens up to a backtick,
    a comment, a parenthesised remark, the line's end or, for the agent, the ``--`` before the training command)."""
    found = []
    for path in DOCUMENTED:
        text = path.read_text().replace("\\\n", " ")  # shell line continuations
        for match in re.finditer(rf"{re.escape(prefix)}(?![\w-])([^`\n#]*)", text):
            tokens = match[1].split()
            ends = [i for i, t in enumerate(tokens) if t == "--" or t.startswith("(")]  # the command, a remark
            tokens = tokens[: ends[0]] if ends else tokens
            found.append((f"{path.relative_to(ROOT)}: {prefix}{match[1]}", tokens))
    return found


def flags_in(tokens) -> set[str]:
    return {t.strip("[]").split("=")[0].rstrip(",.;:)") for t in tokens if t.strip("[]").startswith("--")}


@pytest.mark.parametrize(("command", "at_least"), [("tune", 8), ("agent", 4), ("bench", 4), ("pretrain", 2)])
def test_every_documented_flag_spelling_still_works(command, at_least, capsys):
    from lightning_fms.cli import _parser, main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    known = set(re.findall(r"--[\w-]+(?:\.[\w-]+)*", capsys.readouterr().out))
    documented = documented_command_lines(f"lightning-fms {command}")
    assert len(documented) >= at_least
    required = {"tune": {"--config", "--study_dir"}, "agent": {"--study_dir"}, "bench": {"--out"},
                "pretrain": {"--from", "--out"}}[command]  # fmt: skip
    for where, tokens in documented:
        assert flags_in(tokens) <= known, where
        if required <= set(tokens) and not any("[" in t or "..." in t for t in tokens):
            _parser(command).parse_args([command, *tokens])  # the whole documented command line parses


def test_every_documented_tuner_option_exists(capsys, monkeypatch):
    from lightning_fms.cli import main

    monkeypatch.setattr(sys, "path", list(sys.path))  # `fit` makes the current directory importable
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    known = set(re.findall(r"--tuner(?:\.[\w]+)+", capsys.readouterr().out))
    documented = set()
    for path in DOCUMENTED:
        documented |= set(re.findall(r"--tuner(?:\.[\w]+)+", path.read_text()))
    assert len(documented) >= 20
    assert documented <= known, sorted(documented - known)


def test_the_pool_builder_spells_cache_dir_as_bench_does(capsys):
    from lightning_fms.bench.pool import main as pool_main
    from lightning_fms.cli import main

    for entry in (pool_main, lambda argv: main(["bench", *argv])):
        with pytest.raises(SystemExit):
            entry(["--help"])
        assert "--cache_dir" in capsys.readouterr().out
    documented = documented_command_lines("python -m lightning_fms.bench.pool")
    assert documented and all(flags_in(tokens) <= {"--jobs", "--cache_dir", "--quiet"} for _, tokens in documented)
