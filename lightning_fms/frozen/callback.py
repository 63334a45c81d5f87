"""FrozenUnits: the callback that trains only the last ``k`` layer units of a network, epoch by epoch."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_fms.errors import FMSError
from lightning_fms.frozen.units import LayerUnit, _apply, _check_k, _running_stat_norms, layer_units


class FrozenUnits(Callback):
    """Train only the last ``k`` layer units of ``pl_module.<attribute>``.

    At ``on_train_start`` (after the optimizer is built and a checkpoint restored) and at every
    ``on_train_epoch_start`` the callback applies :func:`set_trainable_units` with the current ``self.k``, so
    assigning ``callback.k`` between epochs thaws (or freezes) units from the next epoch on. Norm layers with
    running statistics inside frozen units are put back in eval mode before every training batch, in case a
    hook or user code called ``.train()`` on the whole module.

    The network stays as the last epoch left it after the fit. The optimizer must hold every parameter of the
    network, frozen or not (as :class:`~lightning_fms.zoo.ImageClassifier` does): frozen parameters get no
    gradient, which SGD, Adam and AdamW skip, so thawing later needs no new parameter groups and a checkpoint
    resumed with a larger ``k`` continues exactly. A trainable parameter missing from every optimizer raises
    :class:`FMSError`.

    ``state_dict`` records ``k``; a resumed fit keeps the ``k`` it was constructed with and exposes the
    checkpoint's as :attr:`loaded_k`.

    Args:
        k: Number of trainable units counted from the output side, ``>= 1`` (``k >= n``: everything trains).
        attribute: Dotted attribute of the LightningModule holding the network (``"net"`` for
            :class:`~lightning_fms.zoo.ImageClassifier`); ``None`` or ``""`` splits the LightningModule itself.
        block_types: See :func:`layer_units`.
        container_types: See :func:`layer_units`.

    Example::

        trainer = Trainer(max_epochs=3, callbacks=[FrozenUnits(k=2)])
        trainer.fit(ImageClassifier(net), datamodule=DigitsDataModule())

    """

    def __init__(
        self,
        k: int,
        attribute: str | None = "net",
        *,
        block_types: Sequence[type[nn.Module]] | None = None,
        container_types: Sequence[type[nn.Module]] | None = None,
    ) -> None:
        self.k = _check_k(k)
        self.attribute = attribute or ""
        self.block_types = tuple(block_types or ())
        self.container_types = tuple(container_types or ())
        self.loaded_k: int | None = None
        self.trainable_names: list[str] = []
        self.num_units: int | None = None
        self._root: nn.Module | None = None
        self._units: list[LayerUnit] = []
        self._frozen_norms: list[nn.Module] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(attribute=self.attribute)

    def target(self, pl_module: pl.LightningModule) -> nn.Module:
        """Return the network this callback splits (``pl_module.<attribute>``).

        Raises:
            FMSError: When the attribute is missing or not an ``nn.Module``.

        """
        if not self.attribute:
            return pl_module
        try:
            net = operator.attrgetter(self.attribute)(pl_module)
        except AttributeError:
            raise FMSError(f"FrozenUnits: {type(pl_module).__name__} has no attribute {self.attribute!r}") from None
        if not isinstance(net, nn.Module):
            raise FMSError(f"FrozenUnits: {type(pl_module).__name__}.{self.attribute} is not an nn.Module")
        return net

    def apply(self, pl_module: pl.LightningModule) -> list[str]:
        """Apply the current ``k`` to the network now; return the trainable parameter names."""
        net = self.target(pl_module)
        if net is not self._root:
            self._units = layer_units(net, block_types=self.block_types, container_types=self.container_types)
            self._root = net
            if not self._units:
                raise FMSError(f"FrozenUnits: {type(net).__name__} has no parameters to split into layer units")
        self.num_units = len(self._units)
        self.trainable_names = _apply(net, self._units, self.k)
        self._frozen_norms = _running_stat_norms(self._units[: len(self._units) - min(self.k, len(self._units))])
        return self.trainable_names

    def _check_optimizers(self, trainer: pl.Trainer) -> None:
        if not trainer.optimizers:
            return
        held = {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]}
        missing = [
            name
            for unit in self._units
            for name, param in zip(unit.parameter_names, unit.parameters)
            if param.requires_grad and id(param) not in held
        ]
        if missing:
            raise FMSError(
                f"FrozenUnits: {len(missing)} trainable parameter(s) (e.g. {missing[0]!r}) are in no optimizer; "
                "configure_optimizers must pass every parameter, frozen or not"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(pl_module)
        self._check_optimizers(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(pl_module)
        self._check_optimizers(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for norm in self._frozen_norms:
            if norm.training:
                norm.eval()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded_k = int(state_dict["k"])
