"""FrozenUnits in real fits: frozen parameters and statistics stay put, thawing on resume continues exactly."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_fms.errors import FMSError
from lightning_fms.frozen.callback import FrozenUnits
from lightning_fms.frozen.units import layer_units
from lightning_fms.training.quiet import quiet_lightning
from lightning_fms.training.seeder import TrialSeeder
from lightning_fms.zoo import MLP, DeepSets, DigitsDataModule, ImageClassifier, SmallCNN, TinyResNet, TinyViT


def expected_units(arch: str) -> list[tuple[str, list[str]]]:
    """The unit list the callback must follow (pinned against hand-written lists in test_units.py)."""
    return [(unit.name, list(unit.parameter_names)) for unit in layer_units(NETS[arch]())]


NETS = {"MLP": MLP, "SmallCNN": SmallCNN, "TinyResNet": TinyResNet, "TinyViT": TinyViT, "DeepSets": DeepSets}


def _trainable(net: nn.Module) -> list[str]:
    return [name for name, p in net.named_parameters() if p.requires_grad]


def _trainer(max_epochs: int, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=5,
        limit_val_batches=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


def _classifier(arch: str, seed: int = 0) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(NETS[arch](), lr=0.1, weight_decay=0.05, momentum=0.9, max_epochs=3)


def _running_stats(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in net.named_buffers() if n.rsplit(".", 1)[-1].startswith(("running_", "num_"))}


@pytest.mark.parametrize(
    ("arch", "k"), [("MLP", 1), ("SmallCNN", 2), ("TinyResNet", 2), ("TinyViT", 3), ("DeepSets", 2)]
)
def test_frozen_parameters_and_batchnorm_statistics_do_not_move_in_a_real_fit(arch, k) -> None:
    model = _classifier(arch)
    params = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    stats = _running_stats(model.net)
    callback = FrozenUnits(k)
    with quiet_lightning():
        _trainer(2, [callback, TrialSeeder(0)]).fit(model, datamodule=DigitsDataModule(batch_size=32))
    trainable = [n for _, names in expected_units(arch)[-k:] for n in names]
    assert callback.trainable_names == trainable and callback.num_units == len(expected_units(arch))
    for name, param in model.net.named_parameters():
        assert torch.equal(param, params[name]) == (name not in trainable), name
    trainable_units = [u for u, _ in expected_units(arch)[-k:]]
    for name, value in _running_stats(model.net).items():
        in_trainable_unit = any(name.startswith(f"{u}.") for u in trainable_units)
        assert torch.equal(value, stats[name]) == (not in_trainable_unit), name
    if arch in ("TinyResNet", "DeepSets"):
        assert stats, "the architecture has BatchNorm statistics"


class _ThawAt(FrozenUnits):
    """Trains ``k`` units until epoch ``epoch`` (0-based), then ``later`` units."""

    def __init__(self, k: int, later: int, epoch: int) -> None:
        super().__init__(k)
        self.later, self.epoch = later, epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= self.epoch:
            self.k = self.later
        super().on_train_epoch_start(trainer, pl_module)


class _OptimizerProbe(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.with_state = sorted(names[id(p)] for p in trainer.optimizers[0].state)


def test_resume_with_more_units_thawed_continues_exactly(tmp_path) -> None:
    arch, n = "TinyResNet", len(expected_units("TinyResNet"))
    datamodule = DigitsDataModule(batch_size=32)

    straight = _classifier(arch)
    with quiet_lightning():
        _trainer(2, [_ThawAt(1, n, epoch=1), TrialSeeder(7)]).fit(straight, datamodule=datamodule)

    first = _classifier(arch)
    frozen_before = {n: p.detach().clone() for n, p in first.net.named_parameters() if not n.startswith("head.")}
    with quiet_lightning():
        trainer = _trainer(1, [FrozenUnits(1), TrialSeeder(7)])
        trainer.fit(first, datamodule=datamodule)
        trainer.save_checkpoint(tmp_path / "epoch-1.ckpt")
    assert all(torch.equal(p, frozen_before[n]) for n, p in first.net.named_parameters() if n in frozen_before)

    resumed = _classifier(arch, seed=123)  # different init: everything must come from the checkpoint
    thaw, probe = FrozenUnits(n), _OptimizerProbe()
    with quiet_lightning():
        trainer = _trainer(2, [thaw, probe, TrialSeeder(7)])
        trainer.fit(resumed, datamodule=datamodule, ckpt_path=tmp_path / "epoch-1.ckpt", weights_only=True)
    assert thaw.loaded_k == 1 and thaw.k == n and trainer.current_epoch == 2
    assert probe.with_state == ["net.head.bias", "net.head.weight"]  # momentum only where epoch 1 trained
    assert all(p.requires_grad for p in resumed.net.parameters())
    straight_state, resumed_state = straight.state_dict(), resumed.state_dict()
    assert straight_state.keys() == resumed_state.keys()
    for key, value in straight_state.items():
        assert torch.equal(value, resumed_state[key]), key
    assert not torch.equal(resumed.net.features[1][0].conv1.weight, frozen_before["features.1.0.conv1.weight"])


def test_callback_targets_state_and_optimizer_check() -> None:
    callback = FrozenUnits(2, attribute="net")
    assert callback.state_dict() == {"k": 2} and "attribute" in callback.state_key
    callback.load_state_dict({"k": 1})
    assert callback.loaded_k == 1 and callback.k == 2
    with pytest.raises(FMSError, match="no attribute"):
        FrozenUnits(1, attribute="backbone").target(_classifier("MLP"))

    class HeadOnlyOptimizer(ImageClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net.head.parameters(), lr=0.1)

    torch.manual_seed(0)
    model = HeadOnlyOptimizer(MLP())
    with quiet_lightning(), pytest.raises(FMSError, match="in no optimizer"):
        _trainer(1, [FrozenUnits(2)]).fit(model, datamodule=DigitsDataModule(batch_size=32))
