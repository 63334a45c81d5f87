"""The test suite itself: test code is shared through fixtures (conftest.py) or lightning_fms.testing, never imported.

Importing a test module or a conftest (``from conftest import X``, ``from test_cli import make_cli``) works only
because of how pytest puts folders on ``sys.path``; it breaks under another import mode or when a file moves, runs
the imported module's code twice, and hides what a test depends on. The check reads every file under tests/ with
``ast``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DYNAMIC_IMPORTS = {"import_module", "__import__", "importorskip"}


def _test_file(name: str, bases: list[Path], tests: Path) -> Path | None:
    """The file under ``tests`` that importing ``name`` from one of ``bases`` (sys.path entries) would load."""
    parts = name.split(".")
    for base in bases:
        path = base.joinpath(*parts)
        for candidate in (path.parent / f"{parts[-1]}.py", path / "__init__.py"):
            if candidate.is_file() and candidate.resolve().is_relative_to(tests):
                return candidate
    return None


def _package(path: Path, tests: Path) -> list[str]:
    """The dotted package of a file under ``tests`` as pytest imports it (tests/ itself is no package)."""
    folders = path.parent.relative_to(tests).parts
    return list(folders) if (path.parent / "__init__.py").is_file() else []


def _imported_names(tree: ast.AST, package: list[str]) -> list[tuple[int, list[str]]]:
    """``(line, [names])`` of every import in ``tree``: each absolute name that statement may load."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.append((node.lineno, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            members = [f"{module}.{alias.name}" if module else alias.name for alias in node.names]
            found.append((node.lineno, [*members, module] if module else members))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if function in DYNAMIC_IMPORTS and isinstance(node.args[0].value, str):
                found.append((node.lineno, [node.args[0].value]))
    return found


def imports_of_test_code(tests: Path, root: Path) -> list[str]:
    """``"path:line imports name"`` for every import, in a file under ``tests``, of another file under ``tests``.

    Names resolve as pytest's default import mode makes them resolve: from ``tests`` (and from a file's own
    folder), and from the repository root (``tests.conftest``).
    """
    tests, violations = tests.resolve(), []
    for path in sorted(tests.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        bases = [tests, path.parent, root]
        for line, names in _imported_names(tree, _package(path, tests)):
            for name in names:
                target = _test_file(name, bases, tests)
                if target and target.resolve() != path.resolve():
                    violations.append(f"{path.relative_to(tests)}:{line} imports {name}")
                    break
    return violations


def test_no_test_file_imports_another_test_file_or_a_conftest():
    assert imports_of_test_code(TESTS, ROOT) == [], "share test code through fixtures or lightning_fms.testing"


@pytest.fixture
def fake_suite(tmp_path) -> Path:
    """A repository with a tests/ folder: a conftest, a top-level test module and a test package."""
    tests = tmp_path / "tests"
    (tests / "pkg").mkdir(parents=True)
    for name in ("conftest.py", "test_top.py", "pkg/__init__.py", "pkg/conftest.py", "pkg/test_inner.py"):
        (tests / name).write_text("X = 1\n")
    (tmp_path / "lightning_fms").mkdir()
    (tmp_path / "lightning_fms" / "__init__.py").write_text("")
    return tests


@pytest.mark.parametrize(
    ("where", "source", "flagged"),
    [
        ("test_a.py", "from conftest import X", "conftest"),
        ("test_a.py", "import conftest", "conftest"),
        ("test_a.py", "from test_top import X", "test_top"),
        ("test_a.py", "import tests.conftest", "tests.conftest"),
        ("test_a.py", "from tests.pkg.test_inner import X", "tests.pkg.test_inner"),
        ("test_a.py", "from pkg import test_inner", "pkg.test_inner"),
        ("test_a.py", "from pkg import X", "pkg"),  # the package's __init__ is test code too
        ("test_a.py", "import importlib\nimportlib.import_module('test_top')", "test_top"),
        ("pkg/test_b.py", "from .test_inner import X", "pkg.test_inner"),
        ("pkg/test_b.py", "from . import conftest", "pkg.conftest"),
        ("pkg/test_b.py", "from pkg.conftest import X", "pkg.conftest"),
        ("test_a.py", "import pytest\nfrom lightning_fms import testing\nfrom digits import DigitsFineTuner", None),
        ("pkg/test_b.py", "import json\nfrom lightning_fms.testing import tiny_hub", None),
    ],
)
def test_the_check_finds_each_way_of_importing_test_code(fake_suite, where, source, flagged):
    (fake_suite / where).write_text(source + "\n")
    found = [v for v in imports_of_test_code(fake_suite, fake_suite.parent) if v.startswith(where)]
    assert found == ([] if flagged is None else [f"{where}:{source.count(chr(10)) + 1} imports {flagged}"])
