"""What the Ray tests' workers train: ImageClassifier on digits, optionally slowed down (imported there by name)."""

from __future__ import annotations

import time

from lightning_fms.search.space import SearchSpace
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.zoo import DigitsDataModule, ImageClassifier

SPACE = {
    "hub": {"type": "hub"},
    "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
}


class SlowClassifier(ImageClassifier):
    """ImageClassifier that sleeps ``step_delay`` seconds in every training step."""

    def __init__(self, *args, step_delay: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_delay = step_delay

    def training_step(self, batch, batch_idx):  # noqa: D102 (slowed down)
        time.sleep(self.step_delay)
        return super().training_step(batch, batch_idx)


def epoch_executor(hub, space: dict | None = None) -> InProcessExecutor:
    """The in-process executor of the trials (monitor ``val_acc``; each job gives the cap)."""
    return InProcessExecutor.from_factories(
        SlowClassifier,
        DigitsDataModule,
        SearchSpace.from_dict(space or SPACE, hub_entries=hub.names),
        hub,
        monitor="val_acc",
        datamodule_options={"task": "target", "batch_size": 64},
        trainer_options={"accelerator": "cpu"},
    )
