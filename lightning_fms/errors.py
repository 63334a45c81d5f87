"""Errors that users cause and that the CLI reports as one line with exit status 2."""

from __future__ import annotations


class FMSError(Exception):
    """A problem with the user's input or study (bad recipe, bad checkpoint, locked study, ...).

    The CLI prints ``lightning-fms: error: <message>`` and exits with status 2, without a traceback.
    The message must name the problem in one line.
    """


def error_line(error: BaseException) -> str:
    """The one line the command line prints for a user error: ``lightning-fms: error: <message>``."""
    return "lightning-fms: error: " + " ".join(str(error).split())


class StudyLockedError(FMSError):
    """Another tuner already holds the study directory."""


class CheckpointError(FMSError):
    """A checkpoint or weights file is unreadable, tampered with, or would run code when loaded."""
