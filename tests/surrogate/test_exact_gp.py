"""ExactGPSurrogateBase: the exact posterior, standardisation, state checks and the recovery path in detail.

The contract (test_surrogate_contracts.py) checks recovery from outside; these tests check what a
recovery does inside: which fit is retried, with what jitter, what is reverted and what is logged.
"""

from __future__ import annotations

import logging
import math

import gpytorch
import pytest
import torch

from lightning_fms.surrogate import DeepKernelSurrogate, PlainGPSurrogate, exact_gp
from lightning_fms.testing.surrogates import nan_likelihood, weights_only_round_trip

CAP = 8
X_DIM = 3
FAST = {"full_fit_steps": 80, "refine_steps": 8, "learning_rate": 1e-2, "device": "cpu"}


def deep_kernel(**options) -> DeepKernelSurrogate:
    return DeepKernelSurrogate(**{"x_dim": X_DIM, "curve_length": CAP, **FAST, **options})


@pytest.mark.parametrize(
    "make",
    [
        lambda: deep_kernel(kernel="matern"),
        lambda: PlainGPSurrogate(x_dim=X_DIM, curve_length=CAP, device="cpu", steps=30),
    ],
    ids=["deep_kernel", "plain_gp"],
)
def test_posterior_matches_gpytorch_prediction(make, data) -> None:
    train, y, test, _ = data
    surrogate = make()
    surrogate.fit(train, y, seed=3)
    mean, var = surrogate.posterior(test)
    model = surrogate._model
    model.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10_000):
        prediction = model(surrogate._inputs(test, surrogate._y_mean, surrogate._y_std))
    std = surrogate._y_std
    torch.testing.assert_close(mean, prediction.mean.double() * std + surrogate._y_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, prediction.variance.double().clamp_min(1e-12) * std**2, rtol=1e-5, atol=1e-6)


def test_standardiser_falls_back_to_unit_scale() -> None:
    assert exact_gp.standardiser(torch.tensor([1.0, 3.0])) == (2.0, math.sqrt(2.0))
    assert exact_gp.standardiser(torch.full((4,), 1e6)) == (1e6, 1.0)
    assert exact_gp.standardiser(torch.tensor([0.5])) == (0.5, 1.0)


def test_recovery_from_a_nan_step_retries_a_full_fit(caplog, data) -> None:
    train, y, test, _ = data
    surrogate = deep_kernel(full_fits=1)
    surrogate.fit(train, y, seed=0)
    with nan_likelihood(1), caplog.at_level(logging.WARNING, logger=exact_gp.__name__):
        surrogate.fit(train, y, seed=1)  # a refine fit that fails at once, then a full retry
    assert "numerical failure" in caplog.text
    assert surrogate.num_recoveries == 1 and surrogate.num_prior_fallbacks == 0
    assert (surrogate.num_full_fits, surrogate.num_refine_fits) == (2, 0)
    assert surrogate._jitter == exact_gp.RECOVERY_JITTER
    assert weights_only_round_trip(surrogate.state_dict())["jitter"] == exact_gp.RECOVERY_JITTER
    assert not surrogate.answers_with_prior and bool(torch.isfinite(surrogate.posterior(test)[0]).all())


def test_persistent_failure_reverts_and_forces_a_full_fit(caplog, data) -> None:
    train, y, _, _ = data
    surrogate = deep_kernel(full_fits=1)
    surrogate.fit(train, y, seed=0)
    before = {key: value.clone() for key, value in surrogate._model.state_dict().items()}
    with nan_likelihood(10**9), caplog.at_level(logging.WARNING, logger=exact_gp.__name__):
        surrogate.fit(train, y, seed=1)
    assert "answering with the prior" in caplog.text
    assert surrogate.answers_with_prior
    for key, value in surrogate._model.state_dict().items():  # reverted to the parameters before the fit
        assert torch.equal(value, before[key])
    surrogate.fit(train, y, seed=2)  # after a failure the next fit is a full one, even past full_fits
    assert (surrogate.num_full_fits, surrogate.num_refine_fits) == (2, 0)
    assert not surrogate.answers_with_prior


def test_a_bug_during_fit_restores_the_previous_state(monkeypatch, data) -> None:
    train, y, test, _ = data
    surrogate = deep_kernel(full_fits=1)
    surrogate.fit(train, y, seed=0)
    before = surrogate.posterior(test)

    def broken(self, *args):
        raise KeyError("bug")

    monkeypatch.setattr(DeepKernelSurrogate, "_negative_mll", broken)
    with pytest.raises(KeyError):
        surrogate.fit(train, y, seed=1)
    assert surrogate.num_fits == 1 and surrogate.num_recoveries == 0
    for a, b in zip(before, surrogate.posterior(test), strict=True):
        assert torch.equal(a, b)


def test_load_rejects_another_configuration_or_surrogate(data) -> None:
    train, y, _, _ = data
    surrogate = deep_kernel()
    surrogate.fit(train, y, seed=0)
    with pytest.raises(ValueError, match="config"):
        deep_kernel(hidden=8).load_state_dict(surrogate.state_dict())
    with pytest.raises(ValueError, match="format"):
        PlainGPSurrogate(x_dim=X_DIM, device="cpu").load_state_dict(surrogate.state_dict())


def test_rejects_malformed_rows_and_targets(data) -> None:
    train, y, _, _ = data
    with pytest.raises(ValueError, match="columns"):
        deep_kernel(x_dim=X_DIM + 1).fit(train, y, seed=0)
    with pytest.raises(ValueError, match="targets"):
        deep_kernel().fit(train, torch.full_like(y, math.nan), seed=0)
    with pytest.raises(ValueError, match="shape"):
        PlainGPSurrogate(x_dim=X_DIM, device="cpu").fit(train, y[:-1], seed=0)
