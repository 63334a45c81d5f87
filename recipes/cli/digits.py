"""The user's side of the CLI recipe: a LightningModule that receives its pretrained weights as a file.

``DigitsFineTuner(pretrained="weights/cnn-s.safetensors", lr=...)`` builds the backbone that the weights file
describes (its safetensors metadata holds ``class_path`` and ``init_args``), loads the weights, puts a fresh
head on it and fine-tunes on digits 5-9. Nothing here knows about lightning_fms' tuner: the search changes
``pretrained`` like any other argument.

``python recipes/cli/make_weights.py`` writes the weights files this recipe searches over.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_fms.zoo import MLP


def load_backbone(path: str) -> nn.Module:
    """Build the network a self-describing safetensors file was saved from, with its weights."""
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata() or {}
    module_name, _, name = meta["class_path"].rpartition(".")
    net = getattr(importlib.import_module(module_name), name)(**json.loads(meta["init_args"]))
    net.load_state_dict(load_file(path))
    return net


class DigitsFineTuner(LightningModule):
    """Fine-tune a pretrained digits network (``features`` then ``head``) on digits 5-9.

    Args:
        pretrained: A weights file written by ``make_weights.py`` (``None``: a randomly initialised MLP).
        lr: Peak learning rate of SGD.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        max_epochs: Length of the cosine learning-rate schedule, in epochs.
        num_classes: Classes of the new task.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        max_epochs: int = 10,
        num_classes: int = 5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = load_backbone(pretrained) if pretrained else MLP(num_classes=num_classes)
        self.net.head = nn.Linear(self.net.head.in_features, num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.net.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits.argmax(-1), y)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y))
        self.log("val_acc", self.val_acc, on_epoch=True, batch_size=len(y))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def make_weights(
    out_dir: str | Path, names: tuple[str, ...] = ("mlp-s", "cnn-s", "resnet-xs"), hub_dir: str | Path | None = None
) -> list[Path]:
    """Pretrain small networks on digits 0-4 and save each as a self-describing ``<name>.safetensors``.

    The networks come from :func:`lightning_fms.testing.tiny_hub`, built in ``hub_dir`` (default: the cache,
    ``$LIGHTNING_FMS_CACHE/hubs/tiny``) or reused from there.
    """
    from lightning_fms.hub import load_weights_file
    from lightning_fms.testing import tiny_hub
    from lightning_fms.zoo import default_cache_dir

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hub = tiny_hub(hub_dir if hub_dir is not None else default_cache_dir() / "hubs" / "tiny")
    written = []
    for name in names:
        entry = hub.entry(name)
        meta = {"class_path": entry.class_path, "init_args": json.dumps(entry.init_args)}
        path = out / f"{name}.safetensors"
        save_file(load_weights_file(entry.weights, entry.sha256), str(path), metadata=meta)
        written.append(path)
    return written
