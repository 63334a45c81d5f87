"""The plain GP baseline: fit quality on ``[x, budget]``, curves ignored, a fresh fit every time.

Determinism, state round trips and recovery run in test_surrogate_contracts.py.
"""

from __future__ import annotations

import pytest
import torch

from lightning_fms.surrogate import PlainGPSurrogate, SurrogateRows

X_DIM = 2


def make_rows(n: int, seed: int) -> tuple[SurrogateRows, torch.Tensor]:
    """Rows with random curves and a smooth target of ``x[0]`` and the budget (curves carry no signal)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, X_DIM, generator=g)
    budget = torch.randint(1, 11, (n,), generator=g) / 10
    curves = torch.rand(n, 10, generator=g)
    rows = SurrogateRows(x=x, budget=budget, curves=curves, curve_lengths=torch.randint(0, 10, (n,), generator=g))
    targets = torch.sin(3 * x[:, 0]) + budget + 0.01 * torch.randn(n, generator=g)
    return rows, targets


@pytest.fixture(scope="module")
def data():
    return (*make_rows(40, seed=0), *make_rows(30, seed=1))


def test_fit_posterior_tracks_function(data) -> None:
    train, y, test, y_test = data
    surrogate = PlainGPSurrogate(x_dim=X_DIM, curve_length=10, device="cpu")
    surrogate.fit(train, y, seed=0)
    mean, var = surrogate.posterior(test)
    assert mean.dtype == var.dtype == torch.float64 and bool((var >= 1e-12).all())
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


def test_every_fit_starts_from_scratch(data) -> None:
    train, y, test, _ = data
    surrogate = PlainGPSurrogate(x_dim=X_DIM, curve_length=10, device="cpu", steps=20)
    surrogate.fit(test, torch.linspace(0, 1, len(test)), seed=0)
    surrogate.fit(train, y, seed=1)
    fresh = PlainGPSurrogate(x_dim=X_DIM, curve_length=10, device="cpu", steps=20)
    fresh.fit(train, y, seed=1)
    assert (surrogate.num_full_fits, surrogate.num_refine_fits) == (2, 0)
    for a, b in zip(surrogate.posterior(test), fresh.posterior(test), strict=True):
        assert torch.equal(a, b)
