"""The NFN featurizer: widths and specs, flattened feature maps, the statistics fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_fms.errors import FMSError
from lightning_fms.testing.networks import (
    DataDependentNet,
    TinyResidualNet,
    mixed_architectures,
    randomize_batchnorm,
    tiny_cnn,
    tiny_mlp,
)
from lightning_fms.weights import StatsFeaturizer, build_featurizer, permute_hidden_units
from lightning_fms.zoo import SmallCNN


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class PositionMajorCNN(nn.Module):
    """A CNN whose head reads the pooled map flattened position-major (``[B, H, W, C] -> [B, H * W * C]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(12, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.conv(x))).permute(0, 2, 3, 1).flatten(1)
        return self.out(torch.relu(self.fc(h)))


@pytest.mark.parametrize("make", [lambda: tiny_mlp((3, 6, 5, 2)), lambda: tiny_cnn(4, 5)], ids=["mlp", "cnn"])
def test_nfn_tells_networks_apart_and_trains_the_functional(make) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    m = make().double()
    f = build_featurizer("nfn", trainable="all").double()
    a = f([m])
    other = make().double()
    assert (a - f([other])).abs().max() > 1e-4
    f([m, other]).sum().backward()
    assert all(p.grad is not None for p in f.parameters())
    assert any(p.grad.abs().sum() > 0 for p in f.functional.parameters())  # the functional itself is trained


def test_nfn_handles_widths_and_specs_and_without_fallback_rejects_other_architectures() -> None:
    f = build_featurizer("nfn")
    mods = [tiny_mlp((3, 6, 5, 2)), tiny_mlp((3, 9, 4, 2)), tiny_mlp((3, 6, 5, 2))]  # hidden widths may differ
    out = f(mods)
    assert out.shape == (3, 32)
    assert torch.allclose(out[1], f([mods[1]])[0], atol=1e-6)
    assert (
        f([tiny_mlp((4, 6, 2))]).shape == (1, 32) and len(f.extra_functionals) == 1
    )  # another spec: its own functional
    with pytest.raises(FMSError, match="plain chain"):
        build_featurizer("nfn", fallback=False)([TinyResidualNet()])


@pytest.mark.parametrize("make", [lambda: SmallCNN(width=3), PositionMajorCNN], ids=["channel-major", "position-major"])
def test_nfn_reads_a_linear_on_a_flattened_feature_map(make) -> None:  # noqa: ANN001
    torch.manual_seed(3)
    m = make().double()
    f = build_featurizer("nfn", trainable="all").double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = f([m])
    assert not [w for w in caught if "'nfn' featurizer" in str(w.message)] and len(f.fallbacks) == 0  # native
    for seed in range(3):  # the flattened channels move with their weights: still invariant
        assert (a - f([permute_hidden_units(m, gen(seed))])).abs().max() < 1e-5
    assert (a - f([make().double()])).abs().max() > 1e-4
    f([m]).sum().backward()
    assert any(p.grad.abs().sum() > 0 for p in f.functional.parameters())


def test_nfn_falls_back_to_statistics_with_one_warning_per_architecture() -> None:
    f = build_featurizer("nfn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(5)
        f(mixed_architectures())
        f(mixed_architectures())
        f([TinyResidualNet(), DataDependentNet()])
        f([DataDependentNet()])
    names = ("Sequential", "TinyResidualNet", "TinyTransformer", "DataDependentNet")
    messages = {n: [str(w.message) for w in caught if n in str(w.message)] for n in names}
    assert {n: len(m) for n, m in messages.items()} == {n: int(n != "Sequential") for n in names}
    assert "normalisation" in messages["TinyResidualNet"][0] and "residual" in messages["TinyResidualNet"][0]
    assert "attention" in messages["TinyTransformer"][0]
    assert "could not be read by the tracer" in messages["DataDependentNet"][0]
    assert all("per-tensor weight statistics" in m[0] for m in messages.values() if m)
    assert len(f.fallbacks) == 3 and f.functional is not None and len(f.extra_functionals) == 1
    # a fallback is the 'stats' features through the architecture's own trainable projection
    m = randomize_batchnorm(TinyResidualNet(), seed=1)
    expected = f.fallbacks[0].proj(StatsFeaturizer().features(m).float())
    assert torch.allclose(f([m])[0], expected, atol=1e-6)
