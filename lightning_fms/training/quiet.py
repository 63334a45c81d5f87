"""Silence Lightning's per-fit chatter while the tuner runs many short fits."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Mute Lightning's info lines ("GPU available: ...", tips) and its advisory warnings, then restore them."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            from lightning.fabric.utilities.warnings import PossibleUserWarning

            warnings.simplefilter("ignore", PossibleUserWarning)
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*litlogger.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
