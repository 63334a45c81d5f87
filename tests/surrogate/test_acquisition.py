from __future__ import annotations

import math

import torch

from lightning_fms.surrogate import budget_incumbents, expected_improvement


def normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2))


def normal_pdf(z: float) -> float:
    return math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def test_ei_matches_the_closed_form() -> None:
    mean = torch.tensor([1.0, 0.2, -0.5, 3.0])
    var = torch.tensor([4.0, 0.01, 1.0, 0.25])
    inc = torch.tensor([0.0, 0.3, 0.5, 3.5])
    expected = []
    for m, v, i in zip(mean.tolist(), var.tolist(), inc.tolist()):
        s = math.sqrt(v)
        z = (m - i) / s
        expected.append((m - i) * normal_cdf(z) + s * normal_pdf(z))
    ei = expected_improvement(mean, var, inc)
    assert ei.dtype == torch.float64 and ei.shape == (4,)
    torch.testing.assert_close(ei, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert math.isclose(float(ei[0]), 1.3955931, rel_tol=1e-6)  # 1 * Phi(0.5) + 2 * phi(0.5)


def test_ei_tail_is_accurate_and_monotone() -> None:
    z = torch.tensor([-40.0, -30.0, -20.0, -10.0, -5.0, -2.0, -1.0, -0.5])
    ei = expected_improvement(z, torch.ones_like(z), torch.zeros_like(z))
    assert bool((ei >= 0).all()) and bool((ei[1:] > ei[:-1]).all())
    for value, zi in zip(ei[2:4].tolist(), z[2:4].tolist()):  # asymptotic series phi(z)/z^2 (1 - 3/z^2 + 15/z^4 - ...)
        series = normal_pdf(zi) / zi**2 * (1 - 3 / zi**2 + 15 / zi**4 - 105 / zi**6 + 945 / zi**8)
        assert math.isclose(value, series, rel_tol=1e-5)


def test_ei_is_zero_far_below_and_grows_with_variance() -> None:
    ei = expected_improvement(torch.tensor([0.0]), torch.tensor([1e-10]), torch.tensor([1.0]))
    assert float(ei[0]) < 1e-30
    variances = torch.tensor([1e-4, 1e-2, 1.0, 100.0])
    ei = expected_improvement(torch.zeros(4), variances, torch.full((4,), 0.3))
    assert bool((ei[1:] > ei[:-1]).all())


def test_ei_degenerate_cases() -> None:
    mean = torch.tensor([0.5, 2.0, 1.0, 1.0])
    ei = expected_improvement(mean, torch.tensor([0.0, 0.0, -1e-9, 1.0]), torch.tensor([1.0, 1.0, 0.25, math.inf]))
    torch.testing.assert_close(ei, torch.tensor([0.0, 1.0, 0.75, 0.0], dtype=torch.float64))
    # nothing observed: incumbent -inf -> mean + std, finite and monotone in mean and variance
    ei = expected_improvement(torch.tensor([-1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 4.0]), torch.tensor(-math.inf))
    torch.testing.assert_close(ei, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))


def test_budget_incumbents_exact_epoch_then_overall_best() -> None:
    epochs = torch.tensor([1, 1, 2, 3, 3, 5])
    scores = torch.tensor([0.1, 0.4, 0.35, 0.2, 0.6, 0.3])
    candidates = torch.tensor([1, 2, 3, 4, 5, 6, 0])
    result = budget_incumbents(epochs, scores, candidates)
    expected = torch.tensor([0.4, 0.35, 0.6, 0.6, 0.3, 0.6, 0.6], dtype=torch.float64)
    torch.testing.assert_close(result, expected)


def test_budget_incumbents_empty_and_nan() -> None:
    empty = budget_incumbents(torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.tensor([1, 2]))
    assert bool(torch.isneginf(empty).all()) and empty.shape == (2,)
    result = budget_incumbents(torch.tensor([1, 2]), torch.tensor([math.nan, 0.2]), torch.tensor([1, 2]))
    torch.testing.assert_close(result, torch.tensor([0.2, 0.2], dtype=torch.float64))
