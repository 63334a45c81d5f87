"""``trainable="readout" | "all" | "auto"`` of the NFN and FLAT featurizers (frozen trunk, cached per checkpoint)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lightning_fms.errors import FMSError
from lightning_fms.surrogate import DeepKernelSurrogate, SurrogateRows
from lightning_fms.testing.networks import TinyResidualNet, randomize_batchnorm, tiny_cnn, tiny_mlp
from lightning_fms.weights import Featurizer, StatsFeaturizer, build_featurizer

NAMES = ["nfn", "flat"]
CAP = 4


@pytest.fixture(autouse=True)
def _quiet_fallback() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the 'nfn' featurizer embeds")
        yield


def checkpoints(seed: int = 0) -> tuple[list[nn.Module], list[tuple[str, int]]]:
    """Two MLP widths, a CNN and a ResNet (NFN: two functionals and a statistics fallback; FLAT: four MLPs)."""
    torch.manual_seed(seed)
    modules = [
        tiny_mlp((3, 6, 5, 2)),
        tiny_mlp((3, 6, 5, 2)),
        tiny_mlp((3, 9, 4, 2)),
        tiny_cnn(4, 5),
        randomize_batchnorm(TinyResidualNet()).eval(),
    ]
    return modules, [("trial", i) for i in range(len(modules))]


def make(name: str, seed: int = 0, **options: object) -> Featurizer:
    torch.manual_seed(seed)
    return build_featurizer(name, embedding_dim=8, **options)


def trunk_names(f: Featurizer) -> list[str]:
    return [n for n, _ in f.named_parameters() if not f.is_readout_parameter(n)]


def readout_names(f: Featurizer) -> list[str]:
    return [n for n, _ in f.named_parameters() if f.is_readout_parameter(n)]


def count_trunk_rows(f: Featurizer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch ``f.trunk`` to record the batch size of every call."""
    calls: list[int] = []
    original = f.trunk

    def counted(index: int, inputs):  # noqa: ANN001, ANN202
        calls.append(len(inputs))
        return original(index, inputs)

    monkeypatch.setattr(f, "trunk", counted)
    return calls


def rows_for(
    modules: list[nn.Module], keys: list[tuple[str, int]], seed: int = 0
) -> tuple[SurrogateRows, torch.Tensor]:
    """``CAP`` rows per checkpoint, with synthetic curves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(len(modules), 2, generator=g)
    xs, budget, curves, lengths, targets, index = [], [], [], [], [], []
    for i in range(len(modules)):
        curve = 0.3 + 0.5 * x[i, 0] * (1 - torch.exp(-torch.arange(1, CAP + 1) / 2.0))
        for k in range(1, CAP + 1):
            padded = torch.zeros(CAP)
            padded[: k - 1] = curve[: k - 1]
            xs.append(x[i])
            budget.append(k / CAP)
            curves.append(padded)
            lengths.append(k - 1)
            targets.append(curve[k - 1] + 0.01 * torch.randn((), generator=g))
            index.append(i)
    rows = SurrogateRows(
        x=torch.stack(xs),
        budget=torch.tensor(budget),
        curves=torch.stack(curves),
        curve_lengths=torch.tensor(lengths),
        weight_index=torch.tensor(index),
        weights=modules,
        weight_keys=keys,
    )
    return rows, torch.stack(targets)


def cpu_state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}


def test_bad_option_is_one_line() -> None:
    for name in NAMES:
        with pytest.raises(FMSError, match="trainable must be 'all', 'readout' or 'auto'") as err:
            build_featurizer(name, trainable="head")
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_auto_is_readout_on_a_cpu(name: str) -> None:
    modules, keys = checkpoints()
    f = make(name)
    assert f.trainable == "auto" and f.effective_trainable == "readout"
    f.prepare(modules)  # parts built lazily are frozen as they appear
    assert trunk_names(f) and readout_names(f)
    assert not any(p.requires_grad for n, p in f.named_parameters() if n in trunk_names(f))
    assert all(p.requires_grad for n, p in f.named_parameters() if n in readout_names(f))
    f(modules, keys).sum().backward()
    trained = {n for n, p in f.named_parameters() if p.grad is not None}
    assert trained == set(readout_names(f))
    assert make(name, trainable="all").effective_trainable == "all"
    if torch.cuda.is_available():
        g = make(name).cuda()
        assert g.effective_trainable == "all"
        g(modules, keys).sum().backward()
        assert all(p.grad is not None for p in g.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_readout_is_the_same_function_as_all(name: str) -> None:
    modules, keys = checkpoints()
    full = make(name, trainable="all").eval()
    expected = full(modules)
    frozen = make(name, seed=1, trainable="readout")
    frozen.load_state_dict(cpu_state(full))  # rebuilds the parts of the state, frozen
    assert torch.allclose(frozen(modules, keys), expected, atol=1e-6)
    frozen.train()  # training mode: no augmentation (FLAT), same embedding
    assert torch.allclose(frozen(modules, keys), expected, atol=1e-6)
    assert torch.allclose(frozen(modules), expected, atol=1e-6)  # without keys: computed, not cached


@pytest.mark.parametrize("name", NAMES)
def test_only_the_readout_changes_in_a_surrogate_fit(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    modules, keys = checkpoints()
    f = make(name, trainable="readout")
    f.prepare(modules)
    before = cpu_state(f)
    surrogate = DeepKernelSurrogate(
        x_dim=2, curve_length=CAP, featurizer=f, full_fit_steps=30, refine_steps=5, full_fits=2, device="cpu"
    )
    calls = count_trunk_rows(f, monkeypatch)
    rows, y = rows_for(modules, keys)
    for seed in range(3):  # two full fits (each restarts the featurizer from its initial state), one warm start
        surrogate.fit(rows, y, seed=seed)
    assert surrogate.num_full_fits == 2 and surrogate.num_refine_fits == 1
    after = cpu_state(f)
    assert all(torch.equal(before[n], after[n]) for n in trunk_names(f))
    changed = {n for n in readout_names(f) if not torch.equal(before[n], after[n])}
    assert changed == set(readout_names(f))  # heads, fallback projections (NFN), last layers (FLAT)
    assert all(p.grad is None for n, p in f.named_parameters() if n in trunk_names(f))
    # the trunk ran once per checkpoint, over all fits and steps (NFN: not for the ResNet, embedded from statistics)
    assert sum(calls) == (4 if name == "nfn" else 5)
    mean, var = surrogate.posterior(rows)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()


@pytest.mark.parametrize("name", NAMES)
def test_trunk_output_is_cached_per_key(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    modules, keys = checkpoints()
    f = make(name, trainable="readout")
    calls = count_trunk_rows(f, monkeypatch)
    out = f(modules, keys)
    first = sum(calls)
    assert first == (4 if name == "nfn" else 5)
    f(modules[::-1], keys[::-1])  # other batches of the same keys: nothing recomputed
    f(modules[:2], keys[:2])
    assert sum(calls) == first
    with torch.no_grad():
        modules[0][0].weight.add_(1.0)  # same key: the cached trunk output is used, by contract
    assert torch.equal(f(modules, keys), out)
    f(modules)  # no keys: computed every time
    assert sum(calls) == 2 * first
    assert not torch.allclose(f(modules)[0], out[0])
    f.clear_cache()
    f(modules, keys)
    assert sum(calls) == 4 * first


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_cache_invalidation(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    modules, keys = checkpoints()
    f = make(name, trainable="readout")
    init = cpu_state(f)
    out = f(modules, keys)
    for key, value in cpu_state(f).items():
        init.setdefault(key, value)
    optimiser = torch.optim.SGD([p for p in f.parameters() if p.requires_grad], lr=0.1)
    f(modules, keys).pow(2).sum().backward()
    optimiser.step()
    trained = f(modules, keys).detach()
    assert not torch.allclose(trained, out)
    fresh = make(name, seed=3, trainable="readout")  # another seed: its parts come from the state
    fresh.load_state_dict(cpu_state(f))
    assert torch.allclose(fresh(modules, keys), trained, atol=1e-6)
    assert torch.allclose(fresh(modules[::-1], keys[::-1]), trained.flip(0), atol=1e-6)
    calls = count_trunk_rows(f, monkeypatch)
    f.load_state_dict(init)  # the same trunk (a full fit's restart): the cached outputs stay
    assert torch.allclose(f(modules, keys), out, atol=1e-6) and calls == []
    other = make(name, seed=4, trainable="all")
    other.prepare(modules)
    f.load_state_dict(cpu_state(other))  # another trunk: the cache is dropped
    expected = other.eval()(modules)
    assert torch.allclose(f(modules, keys), expected, atol=1e-6) and sum(calls) > 0


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_embedding(name: str) -> None:
    modules, keys = checkpoints()
    f = make(name, seed=5)
    a = f(modules, keys)
    assert torch.equal(make(name, seed=5)(modules, keys), a)
    assert torch.equal(f(modules, keys), a)  # from the cache
    assert torch.allclose(f(modules), a, atol=1e-6)  # computed again
    assert not torch.allclose(make(name, seed=6)(modules, keys), a)


def test_nfn_fallback_in_both_modes() -> None:
    m = randomize_batchnorm(TinyResidualNet(), seed=1)
    for trainable in ("all", "readout"):
        f = make("nfn", trainable=trainable)
        out = f([m], [("hub", "resnet")])
        assert len(f.fallbacks) == 1 and f.functional is None
        expected = f.fallbacks[0].proj(StatsFeaturizer().features(m).float())
        assert torch.allclose(out[0], expected, atol=1e-6)
        out.sum().backward()
        assert f.fallbacks[0].proj.weight.grad is not None  # the projection is a readout: trained in both modes
        assert f.fallbacks[0].proj.weight.requires_grad


def test_flat_readout_does_not_augment() -> None:
    modules, keys = checkpoints()
    f = make("flat", trainable="readout").train()
    assert f.augment
    assert torch.equal(f(modules[:1], keys[:1]), f(modules[:1]))
    g = make("flat", trainable="all").train()
    assert not torch.equal(g(modules[:1]), g(modules[:1]))  # "all" still augments in training mode
