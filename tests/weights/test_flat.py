"""The FLAT featurizer: augmentation by real permutations, one MLP per architecture."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_fms.errors import FMSError
from lightning_fms.testing.networks import tiny_mlp
from lightning_fms.weights import FlatFeaturizer


def test_flat_augmentation_uses_real_permutations() -> None:
    torch.manual_seed(2)
    m = tiny_mlp((3, 6, 5, 2))
    f = FlatFeaturizer(seed=0, trainable="all")
    f.prepare([m])
    assert f.input_dim == sum(p.numel() for p in m.parameters())
    f.eval()
    base = f([m])
    assert torch.equal(base, f([m]))
    f.train()
    augmented = torch.cat([f([m]) for _ in range(4)])
    assert (augmented - base).abs().max() > 1e-6  # training-time inputs are permuted weights
    idx = f._gather_index(m)
    assert idx is not None and sorted(idx.tolist()) == list(range(f.input_dim))  # a permutation of the vector
    # the permuted vector is the flattening of a network computing the same function
    flat = f.flatten(m)[idx]
    rebuilt = copy.deepcopy(m)
    torch.nn.utils.vector_to_parameters(flat, rebuilt.parameters())
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.allclose(m(x), rebuilt(x), atol=1e-5)
    f([m, m]).sum().backward()
    assert all(p.grad is not None for p in f.parameters())


def test_flat_builds_one_mlp_per_architecture() -> None:
    f = FlatFeaturizer()
    f([tiny_mlp((3, 6, 5, 2))])
    assert f([tiny_mlp((3, 7, 5, 2))]).shape == (1, 32) and len(f.extra_mlps) == 1  # a second architecture: its own MLP
    assert f.input_dim == sum(p.numel() for p in tiny_mlp((3, 6, 5, 2)).parameters())  # the first architecture's
    with pytest.raises(FMSError, match="built for 10 values"):
        FlatFeaturizer(input_dim=10)([tiny_mlp()])
