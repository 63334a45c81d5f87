"""Errors that users cause, and the one-line forms in which every error is reported.

User errors (``FMSError``) reach the command line as ``lightning-fms: error: <message>`` with exit status 2.
Trial failures (an exception in a fit, a stderr line of an agent's command) are stored in the study state as
one line. The helpers here are the only places that turn an error into such a line:

- ``one_line``: an exception's whole message with its whitespace runs joined (for user errors that quote a
  cause, e.g. a YAML parser's message).
- ``first_line``: the first line of free text (a traceback, a reason), cut hard at a length (for trial errors
  and tracer fallback reasons, whose stored text must stay the same for the same input).
- ``failure_message``: why a fit failed, ``"<ExceptionType>: <first line of its message>"``, shared by the
  tuner and the benchmark pool builder so that both record the same reason.
"""

from __future__ import annotations


class FMSError(Exception):
    """A problem with the user's input or study (bad recipe, bad checkpoint, locked study, ...).

    The CLI prints ``lightning-fms: error: <message>`` and exits with status 2, without a traceback.
    The message must name the problem in one line.
    """


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line: whitespace runs become one space, cut to ``limit`` characters.

    Args:
        error: The exception (or warning) whose message is wanted.
        limit: The longest result; a longer message keeps its first ``limit - 3`` characters and ends in
            ``"..."``. ``None`` keeps the whole message.

    Returns:
        The message on one line, or the exception's type name when the message is empty.
    """
    text = " ".join(str(error).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text or type(error).__name__


def first_line(text: str, limit: int | None = None) -> str:
    """The first line of ``text`` once its surrounding whitespace is stripped, cut to ``limit`` characters.

    Args:
        text: Free text, possibly over several lines (a traceback, an error message).
        limit: The longest result; longer lines are cut there without a marker. ``None`` keeps the line whole.

    Returns:
        The first line, or ``""`` when ``text`` is blank (callers supply their own placeholder).
    """
    stripped = text.strip()
    return stripped.splitlines()[0][:limit] if stripped else ""


def failure_message(error: BaseException) -> str:
    """Why a fit failed, on one line: ``"<ExceptionType>: <first line of its message>"``.

    The tuner's executor and the benchmark pool builder both record this, so a configuration fails for the
    same reason in both.

    Args:
        error: The exception the fit raised.

    Returns:
        One line naming the exception's type and the first line of its message.
    """
    return first_line(f"{type(error).__name__}: {error}")


def error_line(error: BaseException) -> str:
    """The one line the command line prints for a user error: ``lightning-fms: error: <message>``."""
    return "lightning-fms: error: " + one_line(error)


class StudyLockedError(FMSError):
    """Another tuner already holds the study directory."""


class CheckpointError(FMSError):
    """A checkpoint or weights file is unreadable, tampered with, or would run code when loaded."""
