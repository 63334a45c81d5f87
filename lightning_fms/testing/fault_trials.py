"""What the fault tests' Ray workers train (imported there by name): ImageClassifier on digits, with hooks for faults.

:class:`FaultClassifier` sleeps ``step_delay`` seconds in every training step (epochs long enough to be cut off
in), writes the pid of the process training each epoch to ``pid-e<epoch>`` in its trial folder (how a test finds
the worker to kill) and raises :class:`torch.cuda.OutOfMemoryError` in the first ``oom_attempts`` attempts at each
epoch (counted with files ``oom-e<epoch>-<n>`` in the trial folder).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from lightning_fms.atomic import atomic_write_text
from lightning_fms.search.space import SearchSpace
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.zoo import DigitsDataModule, ImageClassifier

SPACE = {"hub": {"type": "hub"}, "model.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}}
ENTRIES = ["mlp-xs", "cnn-xs"]


class FaultClassifier(ImageClassifier):
    """ImageClassifier that can be slowed down, found by pid, and made to run out of GPU memory."""

    def __init__(self, *args, step_delay: float = 0.0, oom_attempts: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_delay = step_delay
        self.oom_attempts = oom_attempts

    def _trial_dir(self) -> Path:
        return Path(self.logger.save_dir)

    def on_train_epoch_start(self) -> None:  # noqa: D102 (the fault the trial's files ask for)
        epoch = self.current_epoch + 1
        folder = self._trial_dir()
        atomic_write_text(folder / f"pid-e{epoch}", f"{os.getpid()}\n")
        attempts = len(list(folder.glob(f"oom-e{epoch}-*")))
        if attempts < self.oom_attempts:
            (folder / f"oom-e{epoch}-{attempts}").touch()
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (a test's module)")

    def training_step(self, batch, batch_idx):  # noqa: D102 (slowed down)
        time.sleep(self.step_delay)
        return super().training_step(batch, batch_idx)


def epoch_executor(hub, step_delay: float = 0.0) -> InProcessExecutor:
    """The in-process executor of the fault tests' trials (monitor ``val_acc``; each job gives the cap)."""
    return InProcessExecutor.from_factories(
        FaultClassifier,
        DigitsDataModule,
        SearchSpace.from_dict(SPACE, hub_entries=ENTRIES),
        hub,
        monitor="val_acc",
        module_options={"step_delay": step_delay},
        datamodule_options={"task": "target", "batch_size": 64},
        trainer_options={"accelerator": "cpu"},
    )


MY_NODES = {"resources": {"fault-tests": 0.01}}
"""Ray actor options that keep a fault test's workers on the nodes the fault tests start."""
FAST_SURROGATE = {"full_fit_steps": 60, "refine_steps": 10, "full_fits": 2}


def study_options(hub, study_dir, budget: int, **options) -> dict:
    """FMSTuner's arguments (less the executor) of the fault tests' studies."""
    return {
        "space": SearchSpace.from_dict(SPACE, hub_entries=ENTRIES),
        "hub": hub,
        "study_dir": study_dir,
        "budget": budget,
        "monitor": "val_acc",
        "max_epochs_per_trial": 3,
        "num_fresh_candidates": 8,
        "num_startup_trials": 2,
        "surrogate_options": dict(FAST_SURROGATE),
        "progress": False,
        **options,
    }
