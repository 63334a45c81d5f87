"""The statistics featurizer: per-tensor statistics, padding and selection."""

from __future__ import annotations

import torch

from lightning_fms.testing.networks import TinyResidualNet, TinyTransformer, tiny_mlp
from lightning_fms.weights import StatsFeaturizer


def test_stats_features() -> None:
    m = tiny_mlp((3, 6, 5, 2))
    f = StatsFeaturizer(num_tensors=8)
    feats = f.features(m).reshape(8, 9)
    w = m[0].weight.detach().double().flatten()
    q = w.quantile(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    expected = torch.cat([q, w.mean().view(1), w.std(unbiased=False).view(1)])
    assert torch.allclose(feats[0, :7], expected.double(), atol=1e-6)
    assert feats[:6, 8].tolist() == [1] * 6 and feats[6:].abs().sum() == 0  # 6 tensors, zero padded
    spread = StatsFeaturizer(num_tensors=2, selection="spread").features(m).reshape(2, 9)
    last = m[4].bias.detach().double()
    assert torch.isclose(spread[1, 5], last.mean())
    out = f([m, TinyResidualNet(), TinyTransformer()])
    assert out.shape == (3, 32)
    out.sum().backward()
    assert f.proj.weight.grad is not None
