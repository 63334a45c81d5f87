"""Errors that users cause and that the CLI reports as one line with exit status 2."""

from __future__ import annotations


class FMSError(Exception):
    """A problem with the user's input or study (bad recipe, bad checkpoint, locked study, ...).

    The CLI prints ``lightning-fms: error: <message>`` and exits with status 2, without a traceback.
    The message must name the problem in one line.
    """


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line: whitespace runs become one space, cut to ``limit`` characters.

    An empty message gives the exception's type name.
    """
    text = " ".join(str(error).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text or type(error).__name__


def error_line(error: BaseException) -> str:
    """The one line the command line prints for a user error: ``lightning-fms: error: <message>``."""
    return "lightning-fms: error: " + one_line(error)


class StudyLockedError(FMSError):
    """Another tuner already holds the study directory."""


class CheckpointError(FMSError):
    """A checkpoint or weights file is unreadable, tampered with, or would run code when loaded."""
