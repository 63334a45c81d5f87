"""The additive GP ('fms'): its terms, its fit schedule, and that it does not forecast worse than the plain GP."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fms.surrogate import SurrogateRows, build_surrogate
from lightning_fms.surrogate.additive_gp import CURVE_FEATURES, AdditiveGPSurrogate, curve_features
from lightning_fms.surrogate.target_warp import RankWarp


def _rmse(surrogate, train, y, test, y_test) -> float:
    surrogate.fit(train, y, seed=0)
    mean, _ = surrogate.posterior(test)
    return float((mean - y_test.double()).square().mean().sqrt())


def test_curve_features_read_last_best_and_change_and_ignore_padding():
    curves = torch.tensor([[0.2, 0.6, 0.4, 9.0], [0.0, 0.0, 0.0, 0.0], [0.5, 9.0, 9.0, 9.0]])
    rows = SurrogateRows(
        x=torch.zeros(3, 1), budget=torch.ones(3), curves=curves, curve_lengths=torch.tensor([3, 0, 1])
    )
    features = curve_features(rows, mu=0.0, std=0.5)
    assert features.shape == (3, CURVE_FEATURES)
    assert torch.allclose(features[0], torch.tensor([0.8, 1.2, -0.4, 1.0], dtype=torch.float64))
    assert torch.equal(features[1], torch.zeros(CURVE_FEATURES, dtype=torch.float64))  # a fresh configuration
    assert torch.allclose(features[2], torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64))


def _offset_curves(n: int, seed: int, cap: int = 8) -> tuple[SurrogateRows, torch.Tensor]:
    """Trials whose scores carry a per-trial offset that only their curves reveal (not their x)."""
    g = torch.Generator().manual_seed(seed)
    xs, offsets = torch.rand(n, 2, generator=g), 0.15 * torch.randn(n, generator=g)
    rows_x, budget, curves, lengths, targets = [], [], [], [], []
    for i in range(n):
        curve = [0.3 * float(xs[i, 0]) + float(offsets[i]) + 0.4 * (1 - math.exp(-k / 3)) for k in range(1, cap + 1)]
        for k in range(1, cap + 1):
            padded = torch.zeros(cap)
            padded[: k - 1] = torch.tensor(curve[: k - 1])
            rows_x.append(xs[i])
            budget.append(k / cap)
            curves.append(padded)
            lengths.append(k - 1)
            targets.append(curve[k - 1])
    rows = SurrogateRows(
        x=torch.stack(rows_x),
        budget=torch.tensor(budget),
        curves=torch.stack(curves),
        curve_lengths=torch.tensor(lengths),
    )
    return rows, torch.tensor(targets)


def test_the_curve_term_forecasts_better_than_the_plain_gp_when_curves_carry_the_signal():
    train, y = _offset_curves(12, seed=0)
    test, y_test = _offset_curves(10, seed=1)
    later = test.curve_lengths >= 2  # forecasts from at least two observed epochs
    test = SurrogateRows(
        x=test.x[later], budget=test.budget[later], curves=test.curves[later], curve_lengths=test.curve_lengths[later]
    )
    y_test = y_test[later]
    plain = build_surrogate("gp", x_dim=2, curve_length=8, device="cpu")
    additive = build_surrogate("fms", x_dim=2, curve_length=8, device="cpu")  # (targets not warped: the default)
    assert _rmse(additive, train, y, test, y_test) < 0.7 * _rmse(plain, train, y, test, y_test)


def test_noise_in_the_weight_term_does_not_make_it_worse_than_the_plain_gp():
    """Weight features of pure noise: the marginal likelihood switches the term off (no worse than the GP)."""
    from lightning_fms.testing.surrogates import learning_curve_rows
    from lightning_fms.weights import build_featurizer

    train, y = learning_curve_rows(14, seed=3, with_weights=True)
    test, y_test = learning_curve_rows(12, seed=4, with_weights=True)
    plain = build_surrogate("gp", x_dim=3, curve_length=8, device="cpu")
    noisy = build_surrogate(
        "fms",
        x_dim=3,
        curve_length=8,
        featurizer=build_featurizer("stats", embedding_dim=8),
        use_curve=False,
        device="cpu",
    )
    assert _rmse(noisy, train, y, test, y_test) <= 1.1 * _rmse(plain, train, y, test, y_test)


def test_fits_refit_from_scratch_on_the_declared_schedule(data):
    train, y, _, _ = data
    surrogate = AdditiveGPSurrogate(
        x_dim=3, curve_length=8, device="cpu", full_fit_steps=5, refine_steps=2, full_fits=2, refit_every=3
    )
    history = []
    for seed in range(8):
        before = surrogate.num_full_fits
        surrogate.fit(train, y, seed=seed)
        history.append("full" if surrogate.num_full_fits > before else "refine")
    assert history == ["full", "full", "refine", "refine", "full", "refine", "refine", "full"]


def test_refit_every_zero_never_refits_after_the_first_fits(data):
    train, y, _, _ = data
    surrogate = AdditiveGPSurrogate(
        x_dim=3, curve_length=8, device="cpu", full_fit_steps=3, refine_steps=1, refit_every=0
    )
    for seed in range(6):
        surrogate.fit(train, y, seed=seed)
    assert (surrogate.num_full_fits, surrogate.num_refine_fits) == (3, 3)


def test_predictions_come_back_in_target_units_through_the_warp(data):
    train, y, _, _ = data
    scaled = y * 100.0 + 7.0
    surrogate = AdditiveGPSurrogate(x_dim=3, curve_length=8, device="cpu", full_fit_steps=30)
    surrogate.fit(train, scaled, seed=0)
    mean, variance = surrogate.posterior(train)
    assert float((mean - scaled.double()).abs().max()) < 0.25 * float(scaled.std())
    assert bool((variance > 0).all())


@pytest.mark.parametrize("bad", [{"full_fits": 0}, {"refit_every": -1}, {"initial_noise": 0.0}, {"extra_scale": 0.0}])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        AdditiveGPSurrogate(x_dim=3, curve_length=8, device="cpu", **bad)


def test_rank_warp_is_monotone_and_inverts():
    targets = torch.tensor([0.1, 0.95, 0.96, 0.97, 0.97, 0.98])  # one diverged run, a tie
    warp = RankWarp().fit(targets)
    z = warp.forward(targets)
    assert bool((z[1:] >= z[:-1]).all()) and float(z[3]) == float(z[4])
    assert abs(float(z.mean())) < 0.3  # centred: the outlier does not dominate
    back, variance = warp.inverse(z, torch.full_like(z, 0.01))
    assert torch.allclose(back, targets.double(), atol=1e-6)
    assert bool((variance > 0).all())
    outside = warp.forward(torch.tensor([0.0, 1.0]))  # extrapolates linearly beyond the training values
    assert float(outside[0]) < float(z[0]) and float(outside[1]) > float(z[-1])


def test_rank_warp_of_constant_targets_is_the_identity():
    warp = RankWarp().fit(torch.full((4,), 0.5))
    assert warp.is_identity
    assert torch.equal(warp.forward(torch.tensor([0.3])), torch.tensor([0.3]).double())


def test_large_fits_train_on_a_subsample_and_condition_on_every_row(data):
    train, y, test, _ = data
    n = len(train)
    subsampled = AdditiveGPSurrogate(x_dim=3, curve_length=8, device="cpu", full_fit_steps=10, fit_rows=n // 2)
    subsampled.fit(train, y, seed=0)
    mean, _ = subsampled.posterior(train)
    assert float((mean - y.double()).abs().mean()) < 0.05  # the posterior still interpolates every training row
    again = AdditiveGPSurrogate(x_dim=3, curve_length=8, device="cpu", full_fit_steps=10, fit_rows=n // 2)
    again.fit(train, y, seed=0)
    assert torch.equal(again.posterior(test)[0], subsampled.posterior(test)[0])  # the subsample is seeded
