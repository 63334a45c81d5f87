"""The one-line error helpers: user errors, trial failures and the reason a fit failed."""

from __future__ import annotations

import warnings

import pytest

from lightning_fms.errors import FMSError, error_line, failure_message, first_line, one_line
from lightning_fms.search.space import SearchSpace
from lightning_fms.training.executor import EpochJob
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.zoo import DigitsDataModule, ImageClassifier


class ShapeMismatch(ValueError):
    """A subclass, to check that the concrete type is named."""


# one_line: the whole message, whitespace runs joined


def test_one_line_joins_the_lines_and_whitespace_runs_of_a_message():
    error = ValueError("while parsing\n  in 'space.yaml', line 3\n\tbad   indent")
    assert one_line(error) == "while parsing in 'space.yaml', line 3 bad indent"


def test_one_line_of_an_empty_message_is_the_type_name():
    assert one_line(ShapeMismatch()) == "ShapeMismatch"
    assert one_line(RuntimeError("  \n ")) == "RuntimeError"


def test_one_line_cuts_long_messages_with_a_marker_only_when_asked():
    error = RuntimeError("x" * 1000)
    assert one_line(error) == "x" * 1000
    cut = one_line(error, limit=300)
    assert len(cut) == 300 and cut == "x" * 297 + "..."
    assert one_line(RuntimeError("short"), limit=300) == "short"


def test_one_line_reads_warnings_as_well():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("a note\non two lines", UserWarning, stacklevel=1)
    assert one_line(caught[0].message) == "a note on two lines"


def test_error_line_is_the_cli_prefix_and_one_line():
    assert error_line(FMSError("budget must be\n>= 1")) == "lightning-fms: error: budget must be >= 1"


# first_line: the first line of free text, cut hard


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("RuntimeError: boom", "RuntimeError: boom"),
        ("Traceback (most recent call last):\n  File 'x.py'\nRuntimeError: boom", "Traceback (most recent call last):"),
        ("\n\n  indented first\nsecond", "indented first"),
        ("", ""),
        (" \n\t\n", ""),
    ],
)
def test_first_line_keeps_the_first_line_of_the_stripped_text(text, expected):
    assert first_line(text) == expected


def test_first_line_cuts_at_the_limit_without_a_marker():
    assert first_line("y" * 2000 + "\nnext", limit=500) == "y" * 500
    assert first_line("short\nnext", limit=500) == "short"


@pytest.mark.parametrize(
    "error",
    [
        "RuntimeError: boom",
        "boom: learning rate too high",
        "  padded  ",
        "first\nsecond\nthird",
        "\n\nafter blank lines",
        "z" * 700 + "\nmore",
        "",
        "   ",
    ],
)
def test_trial_errors_stored_in_study_state_keep_their_text(error):
    """The optimizer stores ``first_line(error, 500) or "failed"``: the text the study state always had."""
    before = error.strip().splitlines()[0][:500] if error.strip() else "failed"  # the formula studies were saved with
    assert (first_line(error, limit=500) or "failed") == before


# failure_message: why a fit failed, shared by the tuner and the benchmark pool


def test_failure_message_names_the_concrete_exception_type():
    assert failure_message(RuntimeError("injected failure")) == "RuntimeError: injected failure"
    assert failure_message(ShapeMismatch("mat1 and mat2 shapes")) == "ShapeMismatch: mat1 and mat2 shapes"


def test_failure_message_is_one_line_for_a_multi_line_exception():
    error = RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB\n(GPU 0; 8 GiB total)")
    message = failure_message(error)
    assert message == "RuntimeError: CUDA out of memory."
    assert "\n" not in message


def test_failure_message_of_an_empty_exception_still_names_it():
    assert failure_message(KeyError()) == "KeyError:"
    assert failure_message(ValueError("\n")) == "ValueError:"


def test_failure_message_stores_the_same_trial_error_as_the_full_text_did():
    """The tuner used to store the first line of ``"<type>: <message>"``; one-line messages keep that text."""
    for error in (RuntimeError("boom"), ValueError("a\nb"), OSError("q" * 900)):
        full = f"{type(error).__name__}: {error}"
        assert first_line(failure_message(error), limit=500) == full.strip().splitlines()[0][:500]


class MultiLineFailure(ImageClassifier):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("the step failed\nsecond line of detail")


def test_an_in_process_fit_that_raises_reports_its_failure_message(hub, tmp_path):
    spec = {"hub": {"type": "hub"}, "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True}}
    space = SearchSpace.from_dict(spec, hub_entries=hub.names)
    executor = InProcessExecutor.from_factories(
        MultiLineFailure, DigitsDataModule, space, hub, monitor="val_acc", cap=3
    )
    config = {"hub": "mlp-s", "model.lr": 0.05}
    job = EpochJob(0, config, 1, None, tmp_path / "t0-e1.ckpt", tmp_path / "log0", seed=0, monitor="val_acc", cap=3)
    outcome = executor.run_epoch(job)
    assert outcome.error == "RuntimeError: the step failed"
    assert outcome.weights is None and not (tmp_path / "t0-e1.ckpt").exists()
