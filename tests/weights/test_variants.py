from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_fms.errors import FMSError
from lightning_fms.weights import (
    FEATURIZERS,
    FlatFeaturizer,
    GMNFeaturizer,
    NFNFeaturizer,
    StatsFeaturizer,
    build_featurizer,
    permute_hidden_units,
)
from lightning_fms.zoo import SmallCNN

from ._models import DataDependent, TinyResNet, TransformerBlock, cnn, mlp, randomize_bn


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mixed() -> list[nn.Module]:
    """An MLP, a CNN, a ResNet with BatchNorm and a transformer: four architectures."""
    torch.manual_seed(5)
    return [mlp((3, 6, 5, 2)), cnn(4, 5), randomize_bn(TinyResNet()).eval(), TransformerBlock()]


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


def test_registry() -> None:
    assert FEATURIZERS == ("gmn", "nfn", "flat", "stats")
    expected = {"gmn": GMNFeaturizer, "nfn": NFNFeaturizer, "flat": FlatFeaturizer, "stats": StatsFeaturizer}
    for name, cls in expected.items():
        f = build_featurizer(name, embedding_dim=7)
        assert isinstance(f, cls) and isinstance(f, nn.Module) and f.embedding_dim == 7
    assert build_featurizer("gmn").embedding_dim == 32
    with pytest.raises(FMSError, match="known: gmn, nfn, flat, stats") as err:
        build_featurizer("transformer")
    assert "\n" not in str(err.value)
    with pytest.raises(FMSError, match="unknown option"):
        build_featurizer("stats", hidden=3)


# ----------------------------------------------------------------------------------------------------------- NFN


@pytest.mark.parametrize("make", [lambda: mlp((3, 6, 5, 2)), lambda: cnn(4, 5)], ids=["mlp", "cnn"])
def test_nfn_invariance_and_gradients(make) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    m = make().double()
    f = build_featurizer("nfn", trainable="all").double()
    a = f([m])
    for seed in range(3):
        assert (a - f([permute_hidden_units(m, gen(seed))])).abs().max() < 1e-5
    other = make().double()
    assert (a - f([other])).abs().max() > 1e-4
    f([m, other]).sum().backward()
    assert all(p.grad is not None for p in f.parameters())
    assert any(p.grad.abs().sum() > 0 for p in f.functional.parameters())  # the functional itself is trained


def test_nfn_handles_widths_and_specs_and_without_fallback_rejects_other_architectures() -> None:
    f = build_featurizer("nfn")
    mods = [mlp((3, 6, 5, 2)), mlp((3, 9, 4, 2)), mlp((3, 6, 5, 2))]  # hidden widths may differ
    out = f(mods)
    assert out.shape == (3, 32)
    assert torch.allclose(out[1], f([mods[1]])[0], atol=1e-6)
    assert f([mlp((4, 6, 2))]).shape == (1, 32) and len(f.extra_functionals) == 1  # another spec: its own functional
    with pytest.raises(FMSError, match="plain chain"):
        build_featurizer("nfn", fallback=False)([TinyResNet()])


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
        f(mixed())
        f(mixed())
        f([TinyResNet(), DataDependent()])
        f([DataDependent()])
    names = ("Sequential", "TinyResNet", "TransformerBlock", "DataDependent")
    messages = {n: [str(w.message) for w in caught if n in str(w.message)] for n in names}
    assert {n: len(m) for n, m in messages.items()} == {n: int(n != "Sequential") for n in names}
    assert "normalisation" in messages["TinyResNet"][0] and "residual" in messages["TinyResNet"][0]
    assert "attention" in messages["TransformerBlock"][0]
    assert "could not be read by the tracer" in messages["DataDependent"][0]
    assert all("per-tensor weight statistics" in m[0] for m in messages.values() if m)
    assert len(f.fallbacks) == 3 and f.functional is not None and len(f.extra_functionals) == 1
    # a fallback is the 'stats' features through the architecture's own trainable projection
    m = randomize_bn(TinyResNet(), seed=1)
    expected = f.fallbacks[0].proj(StatsFeaturizer().features(m).float())
    assert torch.allclose(f([m])[0], expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------- FLAT


@pytest.mark.parametrize(
    "make,inputs",
    [
        (lambda: mlp((3, 6, 5, 2)), lambda: torch.randn(4, 3)),
        (lambda: cnn(4, 5), lambda: torch.randn(2, 1, 8, 8)),
        (lambda: randomize_bn(TinyResNet()).eval(), lambda: torch.randn(2, 3, 6, 6)),
        (lambda: TransformerBlock(), lambda: torch.randint(0, 11, (2, 6))),
    ],
    ids=["mlp", "cnn", "resnet", "transformer"],
)
def test_permute_hidden_units_keeps_the_function(make, inputs) -> None:  # noqa: ANN001
    torch.manual_seed(1)
    m = make().double().eval()
    x = inputs()
    x = x.double() if x.is_floating_point() else x
    flat = FlatFeaturizer(include_buffers=True)
    for seed in range(3):
        p = permute_hidden_units(m, gen(seed)).eval()
        with torch.no_grad():
            assert torch.allclose(m(x), p(x), atol=1e-10)
        assert not torch.equal(flat.flatten(m), flat.flatten(p))


def test_permute_hidden_units_on_a_state_dict() -> None:
    m = mlp((3, 6, 5, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    for state in (permute_hidden_units(m.state_dict(), gen(0)), permute_hidden_units(m.state_dict(), gen(0), module=m)):
        other = copy.deepcopy(m)
        other.load_state_dict(state)
        assert torch.allclose(m(x), other(x), atol=1e-12)
        assert any(not torch.equal(state[k], v) for k, v in m.state_dict().items())


def test_flat_augmentation_uses_real_permutations() -> None:
    torch.manual_seed(2)
    m = mlp((3, 6, 5, 2))
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
    f([mlp((3, 6, 5, 2))])
    assert f([mlp((3, 7, 5, 2))]).shape == (1, 32) and len(f.extra_mlps) == 1  # a second architecture: its own MLP
    assert f.input_dim == sum(p.numel() for p in mlp((3, 6, 5, 2)).parameters())  # the first architecture's
    with pytest.raises(FMSError, match="built for 10 values"):
        FlatFeaturizer(input_dim=10)([mlp()])


@pytest.mark.filterwarnings("ignore:the 'nfn' featurizer embeds")
@pytest.mark.parametrize("name", ["nfn", "flat"])
def test_mixed_architectures_embed_in_one_call(name: str) -> None:
    modules = mixed()
    torch.manual_seed(6)
    f = build_featurizer(name, embedding_dim=8, trainable="all")
    out = f(modules)
    assert out.shape == (4, 8) and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    params = dict(f.named_parameters())
    parts = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith(("extra", "fallbacks")) else "") for k in params}
    expected = {"functional", "head", "extra_functionals.0", "extra_heads.0", "fallbacks.0", "fallbacks.1"}
    assert parts == (expected if name == "nfn" else {"mlp", "extra_mlps.0", "extra_mlps.1", "extra_mlps.2"})
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())  # every part is trained
    f.eval()
    with torch.no_grad():  # each row is the module's own embedding, whatever else is in the batch
        together = f(modules)
        alone = torch.cat([f([m]) for m in modules[::-1]]).flip(0)
    assert torch.allclose(together, alone, atol=1e-6)


# --------------------------------------------------------------------------------------------------------- STATS


def test_stats_features() -> None:
    m = mlp((3, 6, 5, 2))
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
    out = f([m, TinyResNet(), TransformerBlock()])
    assert out.shape == (3, 32)
    out.sum().backward()
    assert f.proj.weight.grad is not None


def test_stats_is_permutation_invariant() -> None:
    m = TinyResNet().double()
    f = StatsFeaturizer().double()
    assert torch.allclose(f([m]), f([permute_hidden_units(m, gen(3))]), atol=1e-12)


def cpu_state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}  # tensors only


@pytest.mark.parametrize("name", ["flat", "nfn", "gmn", "stats"])
def test_state_dict_round_trips_like_the_surrogate_uses_it(name: str) -> None:
    torch.manual_seed(4)
    modules = [mlp((3, 6, 5, 2)) for _ in range(3)]
    featurizer = build_featurizer(name).eval()
    init = cpu_state(featurizer)  # recorded at construction, before lazily built parts exist
    out = featurizer(modules)
    for key, value in cpu_state(featurizer).items():  # the surrogate records new parts with setdefault
        init.setdefault(key, value)
    featurizer.load_state_dict(init)  # a full fit restarts from the recorded initial values
    assert torch.allclose(featurizer(modules), out, atol=1e-6)
    fresh = build_featurizer(name).eval()  # a restarted process: lazily built parts come from the state
    fresh.load_state_dict(cpu_state(featurizer))
    assert torch.allclose(fresh(modules), out, atol=1e-6)


@pytest.mark.filterwarnings("ignore:the 'nfn' featurizer embeds")
@pytest.mark.parametrize("name", ["flat", "nfn", "gmn", "stats"])
def test_state_dict_round_trips_with_mixed_architectures(name: str) -> None:
    modules = [*mixed(), mlp((3, 9, 4, 2))]
    torch.manual_seed(4)
    featurizer = build_featurizer(name).eval()
    init = cpu_state(featurizer)
    first = featurizer(modules[:2])  # parts appear as architectures arrive: recorded in two steps
    for key, value in cpu_state(featurizer).items():
        init.setdefault(key, value)
    out = featurizer(modules)
    assert torch.allclose(out[:2], first, atol=1e-6)
    for key, value in cpu_state(featurizer).items():
        init.setdefault(key, value)
    featurizer.load_state_dict(init)
    assert torch.allclose(featurizer(modules), out, atol=1e-6)
    torch.manual_seed(4)
    again = build_featurizer(name).eval()  # the parts depend on nothing but the order architectures are first seen
    again(modules[:1] + modules[:2] + modules)
    assert all(torch.equal(v, cpu_state(again)[k]) for k, v in cpu_state(featurizer).items())
    fresh = build_featurizer(name).eval()
    fresh.load_state_dict(cpu_state(featurizer))
    # the rebuilt parts belong to their architectures, not to the order the fresh featurizer sees them in
    assert torch.allclose(fresh(modules[::-1]), out.flip(0), atol=1e-6)
    assert torch.allclose(fresh(modules), out, atol=1e-6)
