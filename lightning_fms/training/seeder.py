"""TrialSeeder: the callback that makes a trial's epochs independent of where they run, and a trial's seeds.

A trial's epoch is numerically the same wherever it runs (the in-process executor, the user's own script under
``lightning-fms agent``) when both seed the same way: the global generators with :func:`initial_seed` before the
trial's module is built (its fresh layers), and a :class:`TrialSeeder` of :func:`trial_seed` in the Trainer.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import RandomSampler
from typing_extensions import override

from lightning_fms.search.seeds import derive_seed, seed_everything_quietly


def initial_seed(seed: int, trial_id: int) -> int:
    """The seed of the global generators when trial ``trial_id``'s module is built (its fresh layers)."""
    return derive_seed(seed, "init", trial_id)


def trial_seed(seed: int, trial_id: int) -> int:
    """The seed of trial ``trial_id``'s :class:`TrialSeeder` in a study seeded with ``seed``."""
    return derive_seed(seed, "trial", trial_id)


class TrialSeeder(Callback):
    """Re-seeds a trial at every epoch from ``(seed, epoch)``.

    Epoch ``k`` then trains the same way whether it runs in one long ``fit`` or in a fresh ``Trainer``
    resumed from the checkpoint of epoch ``k-1``.

    Two things make that hold (both checked against Lightning 2.6, where the first epoch of a ``fit``
    creates its data iterator before any epoch hook, and later epochs after ``on_train_epoch_start``):

    * the shuffling of every ``RandomSampler`` in the training loaders gets its own generator, seeded at
      ``on_train_epoch_start`` (the sampler draws its permutation lazily, at the first batch);
    * the global generators (dropout, noise, ...) are seeded at the first ``on_train_batch_start`` of
      the epoch, after the data loader has taken whatever it draws.

    Bit-exactness covers loaders with ``num_workers=0``; worker processes draw their seeds when the
    iterator is created, which Lightning does at different moments in the two paths.

    Args:
        seed: The trial's seed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        combined = trainer.fit_loop._combined_loader
        loaders = combined.flattened if combined is not None else []
        for loader in loaders:
            sampler = getattr(loader, "sampler", None)
            if isinstance(sampler, RandomSampler):
                sampler.generator = torch.Generator().manual_seed(
                    derive_seed(self.seed, "shuffle", trainer.current_epoch)
                )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            seed_everything_quietly(derive_seed(self.seed, "train", trainer.current_epoch))
