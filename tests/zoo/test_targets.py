"""The benchmark's extra targets and hubs: MNIST-1D as 8x8 images, noisy pretraining labels, the quality hub."""

from __future__ import annotations

import random
import sys
import zlib

import numpy as np
import pytest
import torch

from lightning_fms.errors import FMSError
from lightning_fms.hub import load_weights_file
from lightning_fms.zoo import (
    QUALITY_HUB_SPECS,
    DigitsDataModule,
    Mnist1dDataModule,
    build_hub,
    build_quality_hub,
    load_mnist1d_task,
)
from lightning_fms.zoo.mnist1d import _mnist1d_8x8


def test_mnist1d_tasks_are_balanced_8x8_signals_with_relabelled_targets():
    target = Mnist1dDataModule(task="target", batch_size=16, test_fraction=0.25)
    target.setup()
    x, y = next(iter(target.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert [len(s) for s in (target.train_set, target.val_set, target.test_set)] == [1250, 625, 625]
    for split in (target.train_set, target.val_set, target.test_set):
        counts = torch.bincount(split.tensors[1], minlength=5)
        assert (counts == counts[0]).all()
    images, digits = load_mnist1d_task("all")
    assert images.shape == (5000, 1, 8, 8) and torch.bincount(digits).tolist() == [500] * 10
    assert images.min() == 0 and images.max() == 1
    # about 0.5 % of the values are clipped at either end; the rest spread over the range
    assert 0.003 < float((images == 0).float().mean()) < 0.007 and 0.1 < float(images.std()) < 0.3
    target_images, target_labels = load_mnist1d_task("target")
    assert torch.equal(target_images, images[digits >= 5]) and torch.equal(target_labels, digits[digits >= 5] - 5)
    # signals, not digit images: neighbouring samples along a row are closer than pixels a row apart
    along_rows = (images[..., 1:] - images[..., :-1]).abs().mean()
    across_rows = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    assert along_rows < 0.7 * across_rows


def test_mnist1d_is_generated_identically_and_leaves_the_global_random_state_alone():
    first = _mnist1d_8x8()
    _mnist1d_8x8.cache_clear()
    np.random.seed(7)
    random.seed(7)
    expected_numpy, expected_python = np.random.rand(), random.random()
    np.random.seed(7)
    random.seed(7)
    again = _mnist1d_8x8()
    assert (np.random.rand(), random.random()) == (expected_numpy, expected_python)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_mnist1d_without_the_package_names_the_extra(monkeypatch):
    _mnist1d_8x8.cache_clear()
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    try:
        with pytest.raises(FMSError, match=r"pip install 'lightning_fms\[bench\]'"):
            load_mnist1d_task("target")
    finally:
        _mnist1d_8x8.cache_clear()


def test_label_noise_redraws_only_training_labels():
    clean = DigitsDataModule(task="source", test_fraction=0.2)
    noisy = DigitsDataModule(task="source", test_fraction=0.2, label_noise=0.5)
    for dm in (clean, noisy):
        dm.setup()
    for name in ("val_set", "test_set"):
        for a, b in zip(getattr(clean, name).tensors, getattr(noisy, name).tensors):
            assert torch.equal(a, b)
    assert torch.equal(clean.train_set.tensors[0], noisy.train_set.tensors[0])
    changed = float((clean.train_set.tensors[1] != noisy.train_set.tensors[1]).float().mean())
    # half of the labels are redrawn, and a redrawn label keeps its value with probability 1/5
    assert 0.33 < changed < 0.47
    assert set(noisy.train_set.tensors[1].tolist()) == set(range(5))
    again = DigitsDataModule(task="source", test_fraction=0.2, label_noise=0.5)
    again.setup()
    assert torch.equal(again.train_set.tensors[1], noisy.train_set.tensors[1])
    with pytest.raises(ValueError, match="label_noise"):
        DigitsDataModule(label_noise=1.5)


def test_build_hub_pretrains_an_entry_on_random_labels(tmp_path):
    base = {"family": "mlp", "class_path": "lightning_fms.zoo.MLP", "init_args": {"hidden": 16}, "epochs": 3}
    hub = build_hub(tmp_path, [{**base, "name": "clean"}, {**base, "name": "random", "label_noise": 1.0}])
    clean, random_labels = hub.entry("clean").metadata, hub.entry("random").metadata
    assert random_labels["label_noise"] == 1.0 and "label_noise" not in clean
    assert clean["source_val_acc"] > 0.8 and random_labels["source_val_acc"] < 0.5


def test_quality_hub_specs_are_two_widths_by_six_pretrainings():
    assert len(QUALITY_HUB_SPECS) == 12
    assert {s["class_path"] for s in QUALITY_HUB_SPECS} == {"lightning_fms.zoo.SmallCNN"}
    assert {s["init_args"]["width"] for s in QUALITY_HUB_SPECS} == {8, 16}
    assert sorted({s.get("label_noise", 0.0) for s in QUALITY_HUB_SPECS}) == [0.0, 0.8, 1.0]
    names = [s["name"] for s in QUALITY_HUB_SPECS]
    assert len(set(names)) == len(names) == len({zlib.crc32(n.encode()) % 2**31 for n in names})


@pytest.mark.slow  # pretrains the 12 entries: about 15 s
def test_quality_hub_entries_differ_in_pretraining_quality(tmp_path):
    hub = build_quality_hub(tmp_path)
    accuracy = {e.name: e.metadata["source_val_acc"] for e in hub}
    for width in (8, 16):
        assert accuracy[f"cnn{width:02d}-good-a"] > 0.9 and accuracy[f"cnn{width:02d}-good-b"] > 0.9
        assert accuracy[f"cnn{width:02d}-barely"] < 0.6 and accuracy[f"cnn{width:02d}-random"] < 0.6
        assert accuracy[f"cnn{width:02d}-diverged"] < 0.3
    for entry in hub:  # divergence leaves dead units, not non-finite weights
        assert all(torch.isfinite(t).all() for t in load_weights_file(entry.weights, entry.sha256).values())
