"""Frozen layers as the tuner's second fidelity: trainable-fraction levels and what an epoch at each costs.

With the option on, a decision buys one epoch of one trial *at a trainable fraction* ``f``: only the last
``ceil(f * n)`` of the network's ``n`` layer units (see :func:`lightning_fms.frozen.units.layer_units`) train in
that epoch. A trial only ever thaws (its next epoch trains at least the fraction of its last one), so the
optimizer that holds every parameter from the start continues exactly.

The budget is counted in full-epoch equivalents. An epoch at fraction ``f`` is charged its *cost model*:
the floating-point operations of one training step (forward + backward, counted with
:class:`torch.utils.flop_counter.FlopCounterMode` on one real batch) with that many units trainable,
divided by the same count with every unit trainable. The model is deterministic, so a study restarted
after a crash makes the same decisions (timed costs would not); ``docs/benchmarks.md`` compares it with
measured step times. It counts matrix products and convolutions (elementwise work, data loading,
validation and the optimizer step are left out), so it understates what a frozen epoch really costs when
those dominate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_fms.errors import FMSError

DEFAULT_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 1.0)
"""Levels used when the option is simply ``True``."""


def units_for_fraction(fraction: float, n_units: int) -> int:
    """Trainable units for a fraction: ``ceil(fraction * n_units)``, at least 1 and at most ``n_units``."""
    return max(1, min(n_units, math.ceil(fraction * n_units - 1e-9)))


def check_fractions(option: Any) -> tuple[float, ...] | None:
    """Normalise the option: ``None``/``False`` → off, ``True`` → :data:`DEFAULT_FRACTIONS`, else sorted levels.

    A list must hold distinct numbers in ``(0, 1]``; ``1.0`` (full training) is added when missing, since a
    trial must be able to reach full training.

    Raises:
        FMSError: anything else.
    """
    if option is None or option is False:
        return None
    if option is True:
        return DEFAULT_FRACTIONS
    if isinstance(option, str) or not isinstance(option, Sequence) or not option:
        raise FMSError(f"frozen_layers must be true, false or a list of fractions in (0, 1], got {option!r}")
    levels = set()
    for value in option:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise FMSError(f"frozen_layers fractions must be numbers in (0, 1], got {value!r}")
        levels.add(round(float(value), 6))
    levels.add(1.0)
    return tuple(sorted(levels))


@dataclass(frozen=True)
class FrozenLayers:
    """The second fidelity's levels and each architecture's cost per level.

    Attributes:
        fractions: Sorted trainable-fraction levels, the last one ``1.0``.
        costs: Cost key (the hub entry; ``""`` without a hub) → relative cost per level, aligned with
            ``fractions``.
    """

    fractions: tuple[float, ...]
    costs: Mapping[str, tuple[float, ...]]

    def cost(self, key: str, fraction: float) -> float:
        """Relative cost (full epoch = 1) of an epoch of ``key``'s architecture at ``fraction``.

        Raises:
            FMSError: an unknown key or fraction.
        """
        if key not in self.costs:
            raise FMSError(f"no frozen-layer cost model for {key!r} (known: {sorted(self.costs)})")
        try:
            return float(self.costs[key][self.fractions.index(fraction)])
        except ValueError:
            raise FMSError(f"trainable fraction {fraction} is not one of the levels {list(self.fractions)}") from None

    def levels_from(self, fraction: float) -> tuple[float, ...]:
        """Levels a trial whose last epoch trained ``fraction`` may continue at (thawing only)."""
        return tuple(f for f in self.fractions if f >= fraction - 1e-9)
