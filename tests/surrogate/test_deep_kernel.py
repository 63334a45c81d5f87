"""DyHPO/FMS deep-kernel surrogate: fit quality, the full-fit/refine schedule and its options.

Determinism, state round trips and recovery run in test_surrogate_contracts.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fms.surrogate import DeepKernelSurrogate

CAP = 8
X_DIM = 3
FAST = {"full_fit_steps": 80, "refine_steps": 8, "learning_rate": 1e-2, "device": "cpu"}


def test_fit_tracks_learning_curves(data) -> None:
    train, y, test, y_test = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, **{**FAST, "full_fit_steps": 300})
    surrogate.fit(train, y, seed=0)
    mean, var = surrogate.posterior(test)
    assert mean.dtype == var.dtype == torch.float64
    assert bool((var >= 1e-12).all())
    rmse = (mean - y_test).square().mean().sqrt()
    constant = (y.mean() - y_test).square().mean().sqrt()
    assert rmse < 0.5 * constant, (rmse, constant)
    assert not surrogate.answers_with_prior


def test_another_seed_gives_another_fit(data) -> None:
    train, y, test, _ = data
    answers = []
    for seed in (7, 8):
        surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, **FAST)
        surrogate.fit(train, y, seed=seed)
        answers.append(surrogate.posterior(test)[0])
    assert not torch.equal(answers[0], answers[1])


def test_full_fits_then_refine(monkeypatch, data) -> None:
    train, y, _, _ = data
    surrogate = DeepKernelSurrogate(
        x_dim=X_DIM, curve_length=CAP, full_fits=2, full_fit_steps=12, refine_steps=3, device="cpu"
    )
    calls = []
    original = DeepKernelSurrogate._negative_mll

    def counting(self, *args):
        calls[-1] += 1
        return original(self, *args)

    monkeypatch.setattr(DeepKernelSurrogate, "_negative_mll", counting)
    for fit in range(4):
        calls.append(0)
        surrogate.fit(train, y, seed=fit)
    assert calls == [12, 12, 3, 3]
    assert (surrogate.num_fits, surrogate.num_full_fits, surrogate.num_refine_fits) == (4, 2, 2)


def test_full_fit_restarts_from_scratch(data) -> None:
    train, y, test, _ = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, full_fits=5, **FAST)
    surrogate.fit(train, y, seed=4)
    first = surrogate.posterior(test)
    surrogate.fit(train, y, seed=4)  # full again: same seed and data -> same answer, not a continuation
    assert torch.equal(first[0], surrogate.posterior(test)[0])


def test_initial_noise_option(data) -> None:
    train, y, _, _ = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, initial_noise=0.05, **{**FAST, "full_fit_steps": 0})
    surrogate.fit(train, y, seed=0)
    assert math.isclose(float(surrogate._model.likelihood.noise.detach()), 0.05, rel_tol=1e-5)
    default = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, **{**FAST, "full_fit_steps": 0})
    default.fit(train, y, seed=0)
    assert float(default._model.likelihood.noise.detach()) > 0.5


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"kernel": "linear"}, "kernel"),
        ({"initial_noise": 1e-5}, "initial_noise"),
        ({"cnn_kernel": 0}, "cnn_kernel"),
        ({"x_dim": -1}, "x_dim"),
        ({"dtype": torch.float16}, "dtype"),
    ],
)
def test_rejects_bad_options(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        DeepKernelSurrogate(**{"x_dim": X_DIM, "curve_length": CAP, **options})


def test_rejects_curves_longer_than_the_cap(data) -> None:
    train, y, _, _ = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP - 4, **FAST)
    with pytest.raises(ValueError, match="curve_length"):
        surrogate.fit(train, y, seed=0)
