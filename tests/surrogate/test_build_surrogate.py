"""build_surrogate: surrogates by name, with their options."""

from __future__ import annotations

import pytest
import torch

from lightning_fms.errors import FMSError
from lightning_fms.surrogate import (
    SURROGATES,
    AdditiveGPSurrogate,
    DeepKernelSurrogate,
    PlainGPSurrogate,
    build_surrogate,
)


def test_builds_each_surrogate_with_its_options() -> None:
    assert SURROGATES == ("fms", "dyhpo", "gp")
    fms = build_surrogate("fms", x_dim=2, curve_length=5, use_curve=False, device="cpu", refit_every=4)
    assert isinstance(fms, AdditiveGPSurrogate) and fms.refit_every == 4 and not fms.use_curve
    gp = build_surrogate("gp", x_dim=2, curve_length=5, device="cpu", steps=3)
    assert isinstance(gp, PlainGPSurrogate) and gp.steps == 3
    dyhpo = build_surrogate("dyhpo", x_dim=2, curve_length=5, use_curve=False, device="cpu", refine_steps=7)
    assert isinstance(dyhpo, DeepKernelSurrogate) and dyhpo.refine_steps == 7 and not dyhpo.use_curve


def test_rejects_unknown_names_options_and_a_featurizer_for_the_plain_gp() -> None:
    with pytest.raises(FMSError, match="fms, dyhpo, gp"):
        build_surrogate("bohb", x_dim=2, curve_length=5)
    with pytest.raises(FMSError, match="option"):
        build_surrogate("dyhpo", x_dim=2, curve_length=5, device="cpu", nonsense=1)
    with pytest.raises(FMSError, match="weights"):
        build_surrogate("gp", x_dim=2, curve_length=5, featurizer=torch.nn.Linear(1, 1))
