from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lightning_fms.hub import ModelHub, _import_module_class
from lightning_fms.testing import TINY_HUB_SPECS, tiny_hub
from lightning_fms.zoo import (
    DEMO_HUB_SPECS,
    MLP,
    DeepSets,
    DigitsDataModule,
    ImageClassifier,
    SmallCNN,
    TinyResNet,
    TinyViT,
    default_cache_dir,
    quiet_lightning,
)
from lightning_fms.zoo.build import _init_args
from lightning_fms.zoo.deepsets import pixels_as_set

ARCHITECTURES = [
    (MLP, {"hidden": 32}),
    (SmallCNN, {"width": 12}),
    (TinyResNet, {"width": 8}),
    (TinyViT, {}),
    (TinyViT, {"patch_size": 2}),
    (DeepSets, {}),
    (DeepSets, {"pooling": "sum", "norm": False}),
]


def _quiet_trainer(**kwargs) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


@pytest.mark.parametrize(("cls", "kwargs"), ARCHITECTURES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_architecture_contract(cls, kwargs) -> None:
    torch.manual_seed(0)
    net = cls(image_size=8, num_classes=5, **kwargs).eval()
    x = torch.rand(6, 1, 8, 8)
    features = net.features(x)
    assert isinstance(net.features, nn.Module) and isinstance(net.head, nn.Linear)
    assert features.shape == (6, net.head.in_features) == (6, net.num_features)
    logits = net(x)
    assert logits.shape == (6, 5)
    assert torch.allclose(logits, net.head(features))
    params = sum(p.numel() for p in net.parameters())
    assert 1_000 <= params <= 100_000, params
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_architecture_details() -> None:
    resnet = TinyResNet(width=8)
    assert any(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())
    projections = [m for m in resnet.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(projections) == 1 and projections[0].stride == (2, 2)
    vit = TinyViT(dim=16, heads=2)
    assert any(isinstance(m, nn.MultiheadAttention) for m in vit.modules())
    assert vit.features.cls_token.shape == (1, 1, 16) and vit.features.pos_embed.shape == (1, 5, 16)
    assert vit.features.pos_embed.requires_grad


def test_deepsets_is_a_set_function() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 1, 8, 8)
    elements = pixels_as_set(x)
    assert elements.shape == (3, 64, 3)
    assert torch.equal(elements[:, :, 0], x.flatten(1))
    assert elements[:, :, 1:].min() == -1 and elements[:, :, 1:].max() == 1
    net = DeepSets(hidden=16).eval()
    set_features = net.features
    perm = torch.randperm(64)
    pooled = set_features.phi(elements).mean(1)
    pooled_perm = set_features.phi(elements[:, perm]).mean(1)
    assert torch.allclose(pooled, pooled_perm, atol=1e-6)


def test_digits_shapes_labels_and_range() -> None:
    dm = DigitsDataModule(task="target", batch_size=16)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dm.num_classes == 5
    for dataset in (dm.train_set, dm.val_set):
        images, labels = dataset.tensors
        assert images.min() >= 0 and images.max() <= 1
        assert set(labels.tolist()) == {0, 1, 2, 3, 4}
    n_train, n_val = len(dm.train_set), len(dm.val_set)
    assert abs(n_val / (n_train + n_val) - 0.25) < 0.02


def _fingerprints(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in images}


def test_digits_split_is_deterministic_and_disjoint() -> None:
    def split(seed: int, **kw):
        dm = DigitsDataModule(task="source", seed=seed, **kw)
        dm.setup()
        return dm

    a, b, c = split(0), split(0), split(1)
    for name in ("train_set", "val_set"):
        for ta, tb in zip(getattr(a, name).tensors, getattr(b, name).tensors):
            assert torch.equal(ta, tb)
    assert not torch.equal(a.val_set.tensors[0], c.val_set.tensors[0])
    assert not _fingerprints(a.train_set.tensors[0]) & _fingerprints(a.val_set.tensors[0])

    with_test = split(0, test_fraction=0.2)
    sizes = [len(with_test.train_set), len(with_test.val_set), len(with_test.test_set)]
    assert sum(sizes) == len(a.train_set) + len(a.val_set)
    x, _ = next(iter(with_test.test_dataloader()))
    assert x.shape[1:] == (1, 8, 8)
    with pytest.raises(RuntimeError, match="test_fraction"):
        a.test_dataloader()


def test_source_and_target_tasks_have_disjoint_digits() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    source, target = DigitsDataModule(task="source"), DigitsDataModule(task="target")
    source.setup()
    target.setup()
    source_images = torch.cat([source.train_set.tensors[0], source.val_set.tensors[0]])
    target_images = torch.cat([target.train_set.tensors[0], target.val_set.tensors[0]])
    assert len(source_images) == int(np.sum(digits.target < 5))
    assert len(target_images) == int(np.sum(digits.target >= 5))
    assert not _fingerprints(source_images) & _fingerprints(target_images)
    assert set(target.train_set.tensors[1].tolist()) == set(range(5))


def test_tiny_hub_is_cached_and_matches_the_specs(hub: ModelHub, tmp_path_factory) -> None:
    assert hub.names == [s["name"] for s in TINY_HUB_SPECS]
    assert set(hub.families) == {"mlp", "cnn", "resnet"} and all(len(v) == 2 for v in hub.families.values())
    hub.verify()
    folder = hub.path.parent
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = tiny_hub(folder)  # valid cache: nothing is rebuilt
    assert again.names == hub.names
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    for entry in hub:
        assert entry.metadata["source_val_acc"] > 0.2 and entry.metadata["params"] > 0


def test_demo_specs_cover_five_families() -> None:
    families: dict[str, int] = {}
    for spec in DEMO_HUB_SPECS:
        families[spec["family"]] = families.get(spec["family"], 0) + 1
        args = _init_args(spec, image_size=8, num_classes=5)
        net = _import_module_class(spec["class_path"], spec["name"])(**args)
        assert 1_000 <= sum(p.numel() for p in net.parameters()) <= 100_000
    assert all(families[f] >= 2 for f in ("mlp", "cnn", "resnet"))
    assert {"vit", "deepsets"} <= set(families)


def test_default_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LIGHTNING_FMS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LIGHTNING_FMS_CACHE")
    assert default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "lightning_fms"


def test_reset_head_and_hparams(hub: ModelHub) -> None:
    pretrained = hub.build("mlp-s")
    head = pretrained.head.weight.detach().clone()
    kept = ImageClassifier(hub.build("mlp-s"), reset_head=False)
    assert torch.equal(kept.net.head.weight, head)
    state = torch.get_rng_state()
    reset = ImageClassifier(hub.build("mlp-s"), lr=0.2, dropout=0.1)
    assert torch.equal(torch.get_rng_state(), state), "building must not touch the global RNG"
    assert not torch.equal(reset.net.head.weight, head)
    torch.manual_seed(123)
    same = ImageClassifier(hub.build("mlp-s"))
    assert torch.equal(same.net.head.weight, reset.net.head.weight)  # the fresh head depends on head_seed only
    other = ImageClassifier(hub.build("mlp-s"), head_seed=1)
    assert not torch.equal(other.net.head.weight, reset.net.head.weight)
    bound = 1 / math.sqrt(reset.net.head.in_features)
    assert reset.net.head.weight.abs().max() <= bound and reset.net.head.bias.abs().max() <= bound
    assert torch.equal(reset.net.features[1].weight, pretrained.features[1].weight)  # trunk stays pretrained
    assert "net" not in reset.hparams and reset.hparams.lr == 0.2 and reset.hparams.max_epochs == 20
    wider = ImageClassifier(hub.build("mlp-s"), num_classes=10)
    assert wider.net.head.out_features == 10
    with pytest.raises(Exception, match="features"):
        ImageClassifier(nn.Linear(3, 3))


def test_fine_tuning_beats_chance_and_follows_its_own_schedule(hub: ModelHub) -> None:
    torch.manual_seed(0)
    module = ImageClassifier(hub.build("mlp-s"), lr=0.1, max_epochs=10)
    with quiet_lightning():
        trainer = _quiet_trainer(max_epochs=2)
        trainer.fit(module, datamodule=DigitsDataModule(task="target", seed=0))
    assert trainer.callback_metrics["val_acc"] > 0.5  # chance is 0.2
    assert {"train_loss", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.T_max == 10 and scheduler.last_epoch == 2
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.1 * (1 + math.cos(math.pi * 2 / 10)) / 2)  # not 0, as T_max=2 would give
