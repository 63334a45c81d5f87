"""The promotion mix: sometimes continue the best paused trial of the highest rung instead of asking EI.

Pure DyHPO-style expected improvement starts many trials: a fresh configuration is scored at epoch 1,
where the incumbent is weakest. Syne Tune's DyHPO mixes in successive-halving promotions with a
probability (``probability_sh``) and found that crucial for robust behaviour. Here, with probability
``p`` per decision, the searcher skips the surrogate and continues the best paused trial of the highest
non-empty rung, rungs being the epoch ranges ``[eta^j, eta^(j+1))``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lightning_fms.search.rows import Candidate
from lightning_fms.search.trial import Trial, to_score

#: Reduction factor of the rungs (epochs 1-2, 3-8, 9-26, ...).
RUNG_ETA = 3


def rung_of(epochs: int, eta: int = RUNG_ETA) -> int:
    """The rung of a trial that has trained ``epochs >= 1`` epochs: ``floor(log_eta(epochs))``."""
    rung = 0
    while eta ** (rung + 1) <= epochs:
        rung += 1
    return rung


def promotion_index(
    candidates: Sequence[Candidate], trials: Mapping[int, Trial], mode: str, eta: int = RUNG_ETA
) -> int | None:
    """The candidate that continues the best paused trial of the highest rung, or ``None`` when none is paused.

    A trial's score is its best value so far (in score units: larger is better). Among the candidates of the
    chosen trial (several with the frozen-layer fidelity), the one with the largest trainable fraction.

    Args:
        candidates: The decision's candidates.
        trials: Every trial by id.
        mode: ``"max"`` or ``"min"``.
        eta: Rung reduction factor.
    """
    best: tuple[int, float, int] | None = None  # (rung, score, -trial id)
    chosen: int | None = None
    for trial_id in {c.trial_id for c in candidates if c.trial_id is not None}:
        trial = trials[trial_id]
        scores = [to_score(v, mode) for v in trial.values if math.isfinite(v)]
        if not scores:
            continue
        key = (rung_of(trial.epochs, eta), max(scores), -trial_id)
        if best is None or key > best:
            best, chosen = key, trial_id
    if chosen is None:
        return None
    options = [i for i, c in enumerate(candidates) if c.trial_id == chosen]
    return max(options, key=lambda i: candidates[i].fraction)


__all__ = ["RUNG_ETA", "promotion_index", "rung_of"]
