"""Epochs in flight: the targets a surrogate pretends they will have while several workers train at once.

When a decision is made while other epochs still run, the surrogate should not steer the free worker onto what a
busy one is already finding out. Each running epoch becomes a *pending* row (its configuration, its epoch, the
curve so far, the weights it starts from) that joins the training rows with a made-up target:

* ``"kriging_believer"`` (the default): each pending row gets the previous fit's posterior mean (the constant liar
  before a first fit). The mean stays where it was and the variance near busy trials shrinks. One fit.
* ``"constant_liar"``: every pending row gets the lowest score observed so far. A pessimistic lie lowers expected
  improvement near busy trials, so simultaneous decisions spread out. One fit.
* ``"fantasies"``: ``n`` draws from the previous fit's posterior at the pending rows (marginal per row); the
  surrogate is fitted once per draw and expected improvement is averaged over the draws. ``n`` fits.
* ``"ignore"``: pending epochs are left out (what a single worker sees).

Scores are in the searcher's units (larger is better). A made-up target is kept within the observed scores'
range widened on each side by that range (at least 1, at least the largest magnitude): a posterior far from the
data (an extrapolation, or an ill-conditioned fit) would otherwise hand the next fit a lie that no epoch ever
scored, or one that overflows the fit's float32 targets (the one way found to the crash of a simulated 8-worker study,
docs/benchmarks.md, "Simulated cluster"). On the benchmark pools with 8 workers (docs/benchmarks.md, "Pending
epochs") no strategy won on every task; the Kriging believer was never the worst of the three at 50 and 100
epochs, which is why it is the default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from lightning_fms.errors import FMSError

__all__ = ["DEFAULT_FANTASIES", "DEFAULT_PENDING", "PENDING_STRATEGIES", "check_pending", "pending_targets"]

#: Names accepted for the pending-epoch strategy.
PENDING_STRATEGIES: tuple[str, ...] = ("constant_liar", "kriging_believer", "fantasies", "ignore")
#: The strategy used unless told otherwise.
DEFAULT_PENDING = "kriging_believer"
#: Posterior draws of the ``"fantasies"`` strategy unless told otherwise.
DEFAULT_FANTASIES = 4


def check_pending(strategy: str, fantasies: int) -> None:
    """Refuse an unknown strategy or a fantasy count below one.

    Raises:
        FMSError: naming the bad value.
    """
    if strategy not in PENDING_STRATEGIES:
        raise FMSError(f"unknown pending strategy {strategy!r} (expected one of {', '.join(PENDING_STRATEGIES)})")
    if isinstance(fantasies, bool) or not isinstance(fantasies, int) or fantasies < 1:
        raise FMSError(f"fantasies must be an integer >= 1, got {fantasies!r}")


def pending_targets(
    strategy: str,
    observed: Sequence[float],
    n_pending: int,
    previous_posterior: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None,
    seed: int,
    fantasies: int = DEFAULT_FANTASIES,
) -> list[list[float]]:
    """The made-up targets of ``n_pending`` pending rows, one list per fit the strategy asks for.

    Args:
        strategy: One of :data:`PENDING_STRATEGIES` (not ``"ignore"``).
        observed: The observed training targets (at least one).
        n_pending: How many pending rows.
        previous_posterior: Returns the previous fit's ``(mean, variance)`` at the pending rows, each ``[n_pending]``;
            ``None`` when the surrogate was never fitted (the constant liar is used then).
        seed: Seeds the fantasies' draws.
        fantasies: Draws of ``"fantasies"``.

    Returns:
        ``[K][n_pending]`` finite targets within ``[low - span, high + span]`` of the observed scores (``span``
        their range, at least 1 and at least their largest magnitude): ``K = fantasies`` for ``"fantasies"`` with
        a previous fit, else 1.
    """
    lie = float(min(observed))
    low, high = lie, float(max(observed))
    span = max(high - low, abs(low), abs(high), 1.0)
    if n_pending == 0:
        return [[]]
    if strategy == "constant_liar" or previous_posterior is None:
        return [[lie] * n_pending]
    mean, variance = previous_posterior()
    mean = mean.double().cpu().numpy()
    std = np.sqrt(np.clip(variance.double().cpu().numpy(), 0.0, None))
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        return [[lie] * n_pending]

    def bounded(values: np.ndarray) -> list[float]:
        return np.clip(values, low - span, high + span).tolist()

    if strategy == "kriging_believer":
        return [bounded(mean)]
    if strategy == "fantasies":
        rng = np.random.default_rng(seed)
        return [bounded(mean + std * rng.standard_normal(n_pending)) for _ in range(fantasies)]
    raise FMSError(f"unknown pending strategy {strategy!r} (expected one of {', '.join(PENDING_STRATEGIES)})")
