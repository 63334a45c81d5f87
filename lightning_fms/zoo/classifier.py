"""The LightningModule the tuner fine-tunes: a pretrained hub network with a fresh head."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_fms.errors import FMSError


def init_linear_(layer: nn.Linear, seed: int) -> nn.Linear:
    """Re-initialise ``layer`` in place like ``nn.Linear`` does, but from its own generator seeded with ``seed``.

    The global random state is neither read nor changed, so a fresh head is the same wherever and
    whenever the module is built (e.g. in a trial's first epoch and in a straight re-run).

    Returns:
        The same layer.

    """
    generator = torch.Generator().manual_seed(int(seed))
    weight = torch.empty(layer.weight.shape)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is not None:
            bound = 1.0 / math.sqrt(layer.in_features) if layer.in_features > 0 else 0.0
            layer.bias.copy_(torch.empty(layer.bias.shape).uniform_(-bound, bound, generator=generator))
    return layer


class ImageClassifier(LightningModule):
    """Fine-tunes a hub network (``net.features`` then ``net.head``) on an image classification task.

    The optimiser is SGD with momentum and weight decay; the learning rate follows a cosine schedule
    over the constructor's ``max_epochs`` (the trial's fixed epoch cap), stepped once per epoch. The
    schedule never reads ``trainer.max_epochs``, so training one epoch at a time (freeze-thaw) follows
    the same schedule as one long run.

    Logged metrics (epoch level): ``train_loss``, ``val_loss``, ``val_acc`` (and ``test_loss``, ``test_acc``).

    Args:
        net: The pretrained module; it must expose ``features`` (``[B, 1, H, W] -> [B, F]``) and
            ``head`` (an ``nn.Linear`` ``[B, F] -> [B, K]``). Stored as ``self.net``.
        lr: Peak learning rate.
        weight_decay: SGD weight decay.
        momentum: SGD momentum.
        dropout: Dropout probability on the features before the head.
        max_epochs: Length of the cosine schedule in epochs (the trial's cap).
        reset_head: Re-initialise ``net.head`` (a new task) instead of keeping the pretrained head.
        num_classes: Number of classes of the new task; when it differs from ``net.head.out_features``
            the head is replaced by a fresh ``nn.Linear``. ``None`` keeps the head's size.
        head_seed: Seed of the fresh head's initialisation. The head is drawn from its own generator, never
            from (nor changing) the global random state, so building the module is deterministic.

    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        dropout: float = 0.0,
        max_epochs: int = 20,
        reset_head: bool = True,
        num_classes: int | None = None,
        head_seed: int = 0,
    ):
        super().__init__()
        head = getattr(net, "head", None)
        if not isinstance(getattr(net, "features", None), nn.Module) or not isinstance(head, nn.Linear):
            raise FMSError(
                f"{type(net).__name__} cannot be fine-tuned: it must expose `features` (an nn.Module) "
                "and `head` (an nn.Linear)"
            )
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        if num_classes is not None and num_classes != head.out_features:
            self.net.head = init_linear_(
                nn.Linear(head.in_features, num_classes, bias=head.bias is not None), head_seed
            )
        elif reset_head:
            init_linear_(head, head_seed)
        self.dropout = nn.Dropout(dropout)
        classes = self.net.head.out_features
        self.val_acc = MulticlassAccuracy(num_classes=classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Classify images.

        Args:
            x: Images ``[B, 1, H, W]``.

        Returns:
            Logits ``[B, K]``.

        """
        return self.net.head(self.dropout(self.net.features(x)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one batch ``(x [B, 1, H, W], y [B])``."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=False, batch_size=x.shape[0])
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits.argmax(dim=-1), y)
        self.log(f"{prefix}_loss", loss, on_step=False, on_epoch=True, prog_bar=False, batch_size=x.shape[0])
        self.log(f"{prefix}_acc", metric, on_step=False, on_epoch=True, prog_bar=False, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Log ``val_loss`` and ``val_acc`` for one batch ``(x [B, 1, H, W], y [B])``."""
        return self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Log ``test_loss`` and ``test_acc`` for one batch ``(x [B, 1, H, W], y [B])``."""
        return self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD with a per-epoch cosine schedule of length ``max_epochs`` (the constructor's, not the Trainer's)."""
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(self.hparams.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "frequency": 1}}
