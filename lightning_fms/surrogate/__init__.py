"""Surrogates (the additive GP by default, the deep-kernel GP of DyHPO/FMS, the plain GP) and the acquisition.

* ``_base``: the contract (:class:`SurrogateRows` in, ``(mean, variance)`` out);
* ``exact_gp``: what both GPs share (standardisation, seeded fits, recovery, exact posterior, state);
* ``feature_extractor``: the deep kernel's inputs (row packing, curve CNN, weights branch);
* ``additive_gp`` (the default, ``"fms"``), ``deep_kernel`` (DyHPO and the paper's FMS), ``plain_gp``: the
  surrogates; ``acquisition``: expected improvement.

The contract tests every surrogate passes ship in :mod:`lightning_fms.testing.surrogates`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_fms.errors import FMSError
from lightning_fms.surrogate._base import Surrogate, SurrogateRows
from lightning_fms.surrogate.acquisition import budget_incumbents, expected_improvement
from lightning_fms.surrogate.additive_gp import AdditiveGPSurrogate
from lightning_fms.surrogate.deep_kernel import DeepKernelSurrogate
from lightning_fms.surrogate.plain_gp import PlainGPSurrogate

#: Names accepted by :func:`build_surrogate`.
SURROGATES = ("fms", "dyhpo", "gp")


def build_surrogate(
    name: str,
    *,
    x_dim: int,
    curve_length: int,
    featurizer: nn.Module | None = None,
    use_curve: bool = True,
    device: str | torch.device | None = None,
    **options: Any,
) -> Surrogate:
    """Build a surrogate by name.

    Args:
        name: ``"fms"`` (:class:`AdditiveGPSurrogate`: the plain GP's kernel plus curve and weight terms),
            ``"dyhpo"`` (:class:`DeepKernelSurrogate`; the paper's FMS with a ``featurizer``) or ``"gp"``
            (:class:`PlainGPSurrogate`, which ignores curves).
        x_dim: Number of encoded hyperparameters.
        curve_length: The per-trial epoch cap (curve width of the rows).
        featurizer: Weights encoder (``None``: no weights). Not allowed with ``"gp"``.
        use_curve: Whether the deep kernel reads learning curves.
        device: Surrogate device; ``None`` picks CUDA when available.
        **options: Further keyword arguments of the surrogate's constructor.

    Raises:
        FMSError: An unknown name, a featurizer with ``"gp"``, or an unknown or invalid option.

    """
    if name == "fms":
        factory: Any = AdditiveGPSurrogate
        kwargs: dict[str, Any] = {"featurizer": featurizer, "use_curve": use_curve}
    elif name == "dyhpo":
        factory = DeepKernelSurrogate
        kwargs = {"featurizer": featurizer, "use_curve": use_curve}
    elif name == "gp":
        if featurizer is not None:
            raise FMSError("the plain GP surrogate 'gp' cannot read weights; use 'fms' or 'dyhpo' with a featurizer")
        factory, kwargs = PlainGPSurrogate, {}
    else:
        raise FMSError(f"unknown surrogate {name!r} (expected one of {', '.join(SURROGATES)})")
    try:
        return factory(x_dim=x_dim, curve_length=curve_length, device=device, **kwargs, **options)
    except (TypeError, ValueError) as error:
        raise FMSError(f"bad option for surrogate {name!r}: {error}") from error


__all__ = [
    "SURROGATES",
    "AdditiveGPSurrogate",
    "DeepKernelSurrogate",
    "PlainGPSurrogate",
    "Surrogate",
    "SurrogateRows",
    "budget_incumbents",
    "build_surrogate",
    "expected_improvement",
]
