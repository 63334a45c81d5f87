"""Priors built by hand: a few tensors and valid metadata (what ``lightning-fms pretrain`` would write)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_fms.search.space import HubChoice, SearchSpace
from lightning_fms.transfer.columns import encoded_column_names
from lightning_fms.transfer.prior import PRIOR_FORMAT, Prior

#: The space of the tests' recipe (tests/conftest.py ``make_recipe``) less its hub entries, which a prior may not share.
RECIPE_SPACE = {
    "hub": {"type": "hub", "choices": ["mlp-xs", "cnn-xs"]},
    "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
    "model.momentum": {"type": "float", "low": 0.0, "high": 0.9},
    "data.batch_size": {"type": "categorical", "choices": [32, 64]},
}


def prior_metadata(for_space: SearchSpace, **overrides: Any) -> dict[str, Any]:
    """Valid metadata of a prior for a space (the tests' recipe's settings: dyhpo, no weights, curve cnn)."""
    space = for_space
    metadata = {
        "format": PRIOR_FORMAT,
        "searcher": "dyhpo",
        "weights": "none",
        "curve": "cnn",
        "frozen_layers": False,
        "space": {name: spec for name, spec in space.to_dict().items() if not isinstance(space[name], HubChoice)},
        "hub_key": space.hub_key,
        "columns": encoded_column_names(space),
        "sources": [{"name": "digits", "origin": "/studies/digits", "fingerprint": "ab" * 32, "rows": 3}],
        "training": {"steps": 10, "seed": 0},
    }
    metadata.update(overrides)
    return metadata


@pytest.fixture
def recipe_space() -> SearchSpace:
    """The recipe's space, over two hub entries."""
    return SearchSpace.from_dict(RECIPE_SPACE)


@pytest.fixture
def make_prior(recipe_space) -> Callable[..., Prior]:
    """``make_prior(for_space=None, **metadata_overrides) -> Prior``: a few tensors and valid metadata for a space
    (default: the recipe's)."""

    def make(for_space: SearchSpace | None = None, **overrides: Any) -> Prior:
        tensors = {  # values written out, not drawn: the fingerprint of this prior is pinned
            "surrogate/covar/base_kernel/raw_lengthscale": torch.linspace(-1.0, 1.0, 5).reshape(1, 5),
            "surrogate/likelihood/noise_covar/raw_noise": torch.tensor([0.25]),
            "trunk/0.weight": torch.arange(12, dtype=torch.float64).reshape(4, 3) / 7,
            "trunk/steps": torch.tensor(7),
            "trunk/mask": torch.tensor([True, False, True]),
        }
        return Prior(tensors=tensors, metadata=prior_metadata(for_space or recipe_space, **overrides))

    return make
