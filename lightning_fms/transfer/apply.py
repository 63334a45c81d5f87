"""Starting a study's surrogate from a prior: what :func:`~lightning_fms.search.searcher.build_searcher` calls.

A prior holds two things (:mod:`~lightning_fms.transfer.pretrain` writes them): the surrogate's meta-trained
parameters in a space-independent layout (tensors ``"surrogate/..."``, see :mod:`~lightning_fms.transfer.layout`)
and, optionally, a pretrained weight trunk (tensors ``"trunk/..."``). The trunk goes behind the study's
featurizer, frozen; the parameters become where every fresh fit of the surrogate starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from lightning_fms.errors import FMSError
from lightning_fms.transfer.columns import encoded_column_names
from lightning_fms.transfer.layout import assemble, trainable_state

if TYPE_CHECKING:
    from lightning_fms.search.space import SearchSpace
    from lightning_fms.surrogate import Surrogate
    from lightning_fms.transfer.prior import Prior

SURROGATE_PREFIX = "surrogate/"
"""Prefix of the prior's surrogate parameters."""
TRUNK_PREFIX = "trunk/"
"""Prefix of the prior's weight-trunk state."""


def _section(prior: Prior, prefix: str) -> dict[str, Tensor]:
    return {name[len(prefix) :]: value for name, value in prior.tensors.items() if name.startswith(prefix)}


def trunk_settings(prior: Prior) -> dict[str, Any] | None:
    """The prior's weight-trunk settings (``input_dim``, ``embedding_dim``, ``hidden``), or ``None`` without one."""
    trunk = prior.metadata.get("trunk")
    return dict(trunk) if isinstance(trunk, dict) else None


def prior_featurizer(prior: Prior, featurizer: nn.Module | None) -> nn.Module | None:
    """The featurizer a study with ``prior`` uses: ``featurizer`` itself, or it behind the prior's pretrained trunk.

    Args:
        prior: A prior already checked to fit the study (:func:`~lightning_fms.transfer.prior.check_prior_fits`).
        featurizer: The featurizer the study's ``weights`` setting built (``None``: no weights).

    Raises:
        FMSError: the trunk does not fit the featurizer or its stored state.
    """
    settings = trunk_settings(prior)
    if settings is None or featurizer is None:
        return featurizer
    from lightning_fms.transfer.lookahead import PretrainedFeaturizer, WeightTrunk

    try:
        trunk = WeightTrunk(int(settings["input_dim"]), int(settings["embedding_dim"]), int(settings["hidden"]))
        trunk.load_state_dict(_section(prior, TRUNK_PREFIX))
        return PretrainedFeaturizer(featurizer, trunk)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise FMSError(f"prior {prior.path or ''}: its weight trunk does not fit the featurizer ({error})") from None


def apply_prior(prior: Prior, surrogate: Surrogate, space: SearchSpace, frozen_layers: bool = False) -> None:
    """Make every fit of ``surrogate`` that starts fresh start from the prior's parameters instead.

    Columns are matched by name (:func:`~lightning_fms.transfer.layout.assemble`): a hub entry the prior's
    sources did not have starts at the mean of their hub columns.

    Args:
        prior: A prior already checked to fit the study.
        surrogate: The study's surrogate, just built (an exact-GP surrogate: ``fms`` or ``dyhpo``).
        space: The study's search space.
        frozen_layers: Whether rows carry the trainable-fraction column.

    Raises:
        FMSError: the surrogate cannot take a prior, or the prior's tensors do not fit its model.
    """
    from lightning_fms.surrogate.exact_gp import ExactGPSurrogateBase

    where = f"prior {prior.path}" if prior.path is not None else "the prior"
    if not isinstance(surrogate, ExactGPSurrogateBase):
        raise FMSError(f"{where} is for an exact-GP surrogate, not {type(surrogate).__name__}")
    flat = _section(prior, SURROGATE_PREFIX)
    columns = encoded_column_names(space, frozen_layers)
    hub_prefix = f"{space.hub_key}=" if space.hub_key is not None else None
    try:
        reference = trainable_state(surrogate._probe_model())  # noqa: SLF001 (the surrogate's own model layout)
        state = assemble(flat, reference, surrogate.x_column_parameters(), columns, hub_prefix)
        fit_steps = prior.metadata.get("fit_steps")
        surrogate.set_initial_parameters(state, None if fit_steps is None else int(fit_steps))
    except ValueError as error:
        raise FMSError(f"{where} does not fit this study's surrogate: {error}") from None


__all__ = ["SURROGATE_PREFIX", "TRUNK_PREFIX", "apply_prior", "prior_featurizer", "trunk_settings"]
