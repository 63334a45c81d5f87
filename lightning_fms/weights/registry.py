"""``build_featurizer``: the one entry point the surrogate uses."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from lightning_fms.errors import FMSError

if TYPE_CHECKING:
    from lightning_fms.weights.base import Featurizer

#: Names accepted by :func:`build_featurizer` (the one list the recipe, the flags and the benchmark read).
FEATURIZERS: tuple[str, ...] = ("gmn", "nfn", "flat", "stats", "summary")


def _classes() -> dict[str, type[Featurizer]]:
    from lightning_fms.weights.flat import FlatFeaturizer
    from lightning_fms.weights.gmn import GMNFeaturizer
    from lightning_fms.weights.nfn import NFNFeaturizer
    from lightning_fms.weights.stats import StatsFeaturizer
    from lightning_fms.weights.summary import SummaryFeaturizer

    return {
        "gmn": GMNFeaturizer,
        "nfn": NFNFeaturizer,
        "flat": FlatFeaturizer,
        "stats": StatsFeaturizer,
        "summary": SummaryFeaturizer,
    }


def build_featurizer(name: str, **options: Any) -> Featurizer:
    """Create a checkpoint featurizer.

    Args:
        name: One of :data:`FEATURIZERS`.
        **options: Constructor options of the featurizer (``embedding_dim`` for all but ``"summary"``, whose 20
            features are fixed).

    Returns:
        The featurizer (an ``nn.Module``).

    Raises:
        FMSError: For an unknown name or option.
    """
    if name not in FEATURIZERS:
        raise FMSError(f"unknown weight featurizer {name!r}; known: {', '.join(FEATURIZERS)}")
    cls = _classes()[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise FMSError(
            f"featurizer {name!r} got unknown option(s) {', '.join(unknown)}; accepted: {', '.join(sorted(accepted))}"
        )
    return cls(**options)
