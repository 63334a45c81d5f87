"""TrialSeeder: the callback that makes a trial's epochs independent of where they run."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import RandomSampler
from typing_extensions import override

from lightning_fms.search.seeds import derive_seed, seed_everything_quietly


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
