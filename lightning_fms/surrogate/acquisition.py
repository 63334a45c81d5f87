"""Expected improvement with DyHPO's budget-aware incumbent (maximisation)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_HALF_PI = math.sqrt(math.pi / 2.0)
#: Below this standard deviation a prediction counts as certain: EI is ``max(mean - incumbent, 0)``.
_MIN_STD = 1e-12


def _ei_factor(z: Tensor) -> Tensor:
    """``h(z) = phi(z) + z * Phi(z)`` (so that ``EI = std * h(z)``), accurate also for very negative ``z``.

    For ``z < -1`` the direct form cancels; there ``h(z) = phi(z) * (1 + z * Phi(z) / phi(z))`` with
    Mills' ratio ``Phi(z) / phi(z) = sqrt(pi / 2) * erfcx(-z / sqrt(2))``.
    """
    pdf = torch.exp(-0.5 * z.square()) * _INV_SQRT_2PI
    direct = pdf + z * 0.5 * torch.special.erfc(-z / _SQRT2)
    tail_z = z.clamp(max=-1.0)
    tail = pdf * (1.0 + tail_z * _SQRT_HALF_PI * torch.special.erfcx(-tail_z / _SQRT2))
    return torch.where(z < -1.0, tail, direct).clamp_min(0.0)


def expected_improvement(mean: Tensor, variance: Tensor, incumbent: Tensor) -> Tensor:
    """Compute the expected improvement of Gaussian predictions over incumbents, for maximisation.

    ``EI = (mean - inc) * Phi(z) + std * phi(z)`` with ``z = (mean - inc) / std``, computed in float64
    in the stable form ``std * h(z)``. Special cases:

    * ``variance <= 0`` or ``std < 1e-12``: ``max(mean - incumbent, 0)`` (the deterministic limit);
    * ``incumbent == -inf`` (nothing observed yet): ``mean + std`` — finite, increasing in the mean
      and in the variance (every candidate improves on nothing; prefer high and uncertain);
    * ``incumbent == +inf``: 0.

    Args:
        mean: Predicted means, shape ``[M]``.
        variance: Predicted variances, shape ``[M]`` (negative values are treated as 0).
        incumbent: Incumbent per candidate, shape ``[M]`` (or anything broadcastable, e.g. a scalar).

    Returns:
        Expected improvement, shape ``[M]``, float64, on ``mean``'s device, ``>= 0`` wherever the
        incumbent is finite.

    """
    mean = mean.to(torch.float64)
    std = variance.to(device=mean.device, dtype=torch.float64).clamp_min(0.0).sqrt()
    incumbent = torch.as_tensor(incumbent, dtype=torch.float64, device=mean.device).expand_as(mean)
    finite = torch.isfinite(incumbent)
    safe_incumbent = torch.where(finite, incumbent, torch.zeros_like(incumbent))
    gap = mean - safe_incumbent
    certain = std < _MIN_STD
    safe_std = torch.where(certain, torch.ones_like(std), std)
    ei = torch.where(certain, gap.clamp_min(0.0), safe_std * _ei_factor(gap / safe_std))
    ei = torch.where(finite, ei, torch.where(incumbent < 0, mean + std, torch.zeros_like(mean)))
    return ei


def budget_incumbents(observed_epochs: Tensor, observed_scores: Tensor, candidate_epochs: Tensor) -> Tensor:
    """DyHPO's fidelity-aware incumbent for each candidate.

    For a candidate at epoch ``k``: the best score observed at exactly epoch ``k`` among all trials;
    if no trial has reached epoch ``k`` yet, the best score observed at any epoch; with no
    observations at all, ``-inf``. NaN scores are ignored.

    Args:
        observed_epochs: Epoch of each observation, shape ``[N]`` (long).
        observed_scores: Score of each observation (larger is better), shape ``[N]``.
        candidate_epochs: Epoch each candidate would reach, shape ``[M]`` (long).

    Returns:
        Incumbents, shape ``[M]``, float64, on ``candidate_epochs``' device.

    """
    device = candidate_epochs.device
    candidates = candidate_epochs.to(torch.long)
    epochs = observed_epochs.to(device=device, dtype=torch.long)
    scores = observed_scores.to(device=device, dtype=torch.float64)
    if epochs.shape != scores.shape:
        raise ValueError(f"observed_epochs {tuple(epochs.shape)} and observed_scores {tuple(scores.shape)} differ")
    keep = ~torch.isnan(scores)
    epochs, scores = epochs[keep], scores[keep]
    result = torch.full(candidates.shape, -math.inf, dtype=torch.float64, device=device)
    if scores.numel() == 0:
        return result
    overall = scores.max()
    low = int(epochs.min())
    size = int(epochs.max()) - low + 1
    best = torch.full((size,), -math.inf, dtype=torch.float64, device=device)
    seen = torch.zeros(size, dtype=torch.bool, device=device)
    best.scatter_reduce_(0, epochs - low, scores, reduce="amax", include_self=True)
    seen[epochs - low] = True
    offset = candidates - low
    inside = (offset >= 0) & (offset < size)
    safe = offset.clamp(0, size - 1)
    exact = inside & seen[safe]
    return torch.where(exact, best[safe], result.fill_(float(overall)))
