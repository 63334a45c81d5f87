from __future__ import annotations

import io

import pytest
import torch

from lightning_fms.errors import FMSError
from lightning_fms.surrogate import DeepKernelSurrogate, PlainGPSurrogate, SurrogateRows, build_surrogate, exact_gp

X_DIM = 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small GPs gain nothing from intra-op threads and slow down badly when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_rows(n: int, seed: int) -> tuple[SurrogateRows, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, X_DIM, generator=g)
    budget = torch.randint(1, 11, (n,), generator=g) / 10
    curves = torch.rand(n, 10, generator=g)
    rows = SurrogateRows(x=x, budget=budget, curves=curves, curve_lengths=torch.randint(0, 10, (n,), generator=g))
    targets = torch.sin(3 * x[:, 0]) + budget + 0.01 * torch.randn(n, generator=g)
    return rows, targets


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.fixture(scope="module")
def data():
    return (*make_rows(40, seed=0), *make_rows(30, seed=1))


def test_fit_posterior_tracks_function(data) -> None:
    train, y, test, y_test = data
    surrogate = PlainGPSurrogate(x_dim=X_DIM, curve_length=10, device="cpu")
    surrogate.fit(train, y, seed=0)
    mean, var = surrogate.posterior(test)
    assert mean.shape == var.shape == (30,) and mean.dtype == torch.float64 and mean.device.type == "cpu"
    assert bool((var >= 1e-12).all())
    rmse = (mean - y_test).square().mean().sqrt()
    assert rmse < 0.2 * (y.mean() - y_test).square().mean().sqrt()
    # predictive variance is small near the data, larger far away
    far = SurrogateRows(x=torch.full((1, X_DIM), 5.0), budget=torch.ones(1), curves=torch.zeros(1, 10),
                        curve_lengths=torch.zeros(1, dtype=torch.long))  # fmt: skip
    assert float(surrogate.posterior(far)[1][0]) > 10 * float(var.median())


def test_curves_are_ignored(data) -> None:
    train, y, test, _ = data
    surrogate = PlainGPSurrogate(x_dim=X_DIM, curve_length=10, device="cpu", steps=30)
    surrogate.fit(train, y, seed=0)
    scrambled = SurrogateRows(test.x, test.budget, test.curves * 7 - 3, test.curve_lengths)
    assert torch.equal(surrogate.posterior(test)[0], surrogate.posterior(scrambled)[0])


def test_determinism_and_roundtrip(data) -> None:
    train, y, test, _ = data
    first = PlainGPSurrogate(x_dim=X_DIM, curve_length=10, device="cpu", steps=40)
    second = PlainGPSurrogate(x_dim=X_DIM, curve_length=10, device="cpu", steps=40)
    rng = torch.get_rng_state()
    first.fit(train, y, seed=3)
    assert torch.equal(rng, torch.get_rng_state())
    second.fit(train, y, seed=3)
    for a, b in zip(first.posterior(test), second.posterior(test)):
        assert torch.equal(a, b)
    restored = PlainGPSurrogate(x_dim=X_DIM, curve_length=10, device="cpu", steps=40)
    restored.load_state_dict(roundtrip(first.state_dict()))
    for a, b in zip(first.posterior(test), restored.posterior(test)):
        assert torch.equal(a, b)
    first.fit(test, torch.linspace(0, 1, len(test)), seed=4)
    restored.fit(test, torch.linspace(0, 1, len(test)), seed=4)
    for a, b in zip(first.posterior(train), restored.posterior(train)):
        assert torch.equal(a, b)
    assert first.num_full_fits == 2 and first.num_refine_fits == 0


def test_recovery_and_prior_fallback(monkeypatch, data) -> None:
    train, y, test, _ = data
    surrogate = PlainGPSurrogate(x_dim=X_DIM, curve_length=10, device="cpu", steps=20)
    original_loss = PlainGPSurrogate._negative_mll
    fails = {"left": 1}

    def flaky(self, *args):
        loss = original_loss(self, *args)
        if fails["left"]:
            fails["left"] -= 1
            return loss * float("nan")
        return loss

    monkeypatch.setattr(PlainGPSurrogate, "_negative_mll", flaky)
    surrogate.fit(train, y, seed=0)
    assert surrogate.num_recoveries == 1 and not surrogate.answers_with_prior
    fails["left"] = 10_000
    surrogate.fit(train, y, seed=1)
    assert surrogate.num_prior_fallbacks == 1 and surrogate.answers_with_prior
    mean, var = surrogate.posterior(test)
    assert torch.allclose(mean, torch.full_like(mean, float(y.double().mean())))
    assert torch.allclose(var, torch.full_like(var, float(y.double().std()) ** 2))
    restored = PlainGPSurrogate(x_dim=X_DIM, curve_length=10, device="cpu", steps=20)
    restored.load_state_dict(roundtrip(surrogate.state_dict()))
    assert torch.equal(restored.posterior(test)[0], mean)


def test_one_row_gives_the_prior(data) -> None:
    train, y, test, _ = data
    surrogate = PlainGPSurrogate(x_dim=X_DIM, curve_length=10, device="cpu")
    surrogate.fit(SurrogateRows(train.x[:1], train.budget[:1], train.curves[:1], train.curve_lengths[:1]), y[:1], 0)
    mean, var = surrogate.posterior(test)
    assert torch.allclose(mean, torch.full_like(mean, float(y[0]))) and bool((var == 1).all())


def test_constant_targets_do_not_break(data) -> None:
    train, _, test, _ = data
    surrogate = PlainGPSurrogate(x_dim=X_DIM, curve_length=10, device="cpu", steps=20)
    surrogate.fit(train, torch.full((len(train),), 0.7), seed=0)
    mean, var = surrogate.posterior(test)
    assert torch.allclose(mean, torch.full_like(mean, 0.7), atol=1e-6) and bool(torch.isfinite(var).all())


def test_build_surrogate() -> None:
    assert isinstance(build_surrogate("gp", x_dim=2, curve_length=5, device="cpu"), PlainGPSurrogate)
    dyhpo = build_surrogate("dyhpo", x_dim=2, curve_length=5, use_curve=False, device="cpu", refine_steps=7)
    assert isinstance(dyhpo, DeepKernelSurrogate) and dyhpo.refine_steps == 7 and not dyhpo.use_curve
    with pytest.raises(FMSError, match="dyhpo, gp"):
        build_surrogate("bohb", x_dim=2, curve_length=5)
    with pytest.raises(FMSError, match="option"):
        build_surrogate("dyhpo", x_dim=2, curve_length=5, device="cpu", nonsense=1)
    with pytest.raises(FMSError, match="weights"):
        build_surrogate("gp", x_dim=2, curve_length=5, featurizer=torch.nn.Linear(1, 1))
    assert exact_gp.RECOVERY_JITTER > 0
