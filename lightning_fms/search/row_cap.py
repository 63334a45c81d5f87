"""A cap on the surrogate's training rows that keeps the trials at the highest epochs whole.

An exact GP costs ``O(N^3)`` in its rows, and a freeze-thaw study adds one row per epoch, so a long study
needs a cap. The rows that matter most for the next decision are those of the trials trained furthest (they
define the incumbents and the shape of long curves), so those trials are kept with every row; the remaining
room is filled with a seeded random subsample of the other rows (as Syne Tune's GP searchers do).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lightning_fms.search.rows import RowSpec
from lightning_fms.search.trial import config_key

#: Default cap on the surrogate's training rows (decision cost stays flat beyond it).
DEFAULT_MAX_ROWS = 750


def cap_rows(specs: Sequence[RowSpec], max_rows: int | None, seed: int) -> list[int]:
    """Positions of the rows to keep, in their original order.

    Args:
        specs: ``N`` training rows (one per observed epoch of each trial).
        max_rows: The cap; ``None`` (or ``N <= max_rows``) keeps every row.
        seed: Seeds the order of trials of equal length and the subsample of the rest.

    Returns:
        Sorted positions into ``specs``, at most ``max_rows`` of them: every row of the trials with the
        most epochs (longest first, as many whole trials as fit), then a random subsample of the others.
    """
    n = len(specs)
    if max_rows is None or n <= max_rows:
        return list(range(n))
    rows_of: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for position, spec in enumerate(specs):
        rows_of.setdefault(config_key(spec.config), []).append(position)
    trials = list(rows_of.values())
    rng = np.random.default_rng(seed)
    ties = rng.permutation(len(trials))
    order = sorted(range(len(trials)), key=lambda t: (-max(specs[p].epoch for p in trials[t]), ties[t]))
    kept: list[int] = []
    rest: list[int] = []
    for t in order:
        if not rest and len(kept) + len(trials[t]) <= max_rows:
            kept.extend(trials[t])
        else:
            rest.extend(trials[t])
    room = max_rows - len(kept)
    if room > 0 and rest:
        kept.extend(int(p) for p in rng.choice(np.array(rest), size=min(room, len(rest)), replace=False))
    return sorted(kept)


__all__ = ["DEFAULT_MAX_ROWS", "cap_rows"]
