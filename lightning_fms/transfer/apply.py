"""Starting a study's surrogate from a prior: what :func:`~lightning_fms.search.searcher.build_searcher` calls.

Interface fixed first; the body is filled in by the meta-training work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from lightning_fms.search.space import SearchSpace
    from lightning_fms.surrogate import Surrogate
    from lightning_fms.transfer.prior import Prior


def prior_featurizer(prior: Prior, featurizer: nn.Module | None) -> nn.Module | None:
    """The featurizer a study with ``prior`` uses: ``featurizer`` itself, or it behind the prior's pretrained trunk.

    Args:
        prior: A prior already checked to fit the study (:func:`~lightning_fms.transfer.prior.check_prior_fits`).
        featurizer: The featurizer the study's ``weights`` setting built (``None``: no weights).
    """
    return featurizer


def apply_prior(prior: Prior, surrogate: Surrogate, space: SearchSpace, frozen_layers: bool = False) -> None:
    """Make every fit of ``surrogate`` that starts fresh start from the prior's parameters instead.

    Args:
        prior: A prior already checked to fit the study.
        surrogate: The study's surrogate, just built.
        space: The study's search space (its encoded columns are matched to the prior's by name).
        frozen_layers: Whether rows carry the trainable-fraction column.
    """
    raise NotImplementedError("priors are not applied yet")


__all__ = ["apply_prior", "prior_featurizer"]
