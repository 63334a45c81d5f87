"""The shipped surrogate contract (lightning_fms.testing.surrogates) run against every surrogate."""

from __future__ import annotations

from lightning_fms.surrogate import Surrogate, build_surrogate
from lightning_fms.testing.surrogates import ExactGPContract
from lightning_fms.weights import build_featurizer

#: Tiny fits: the contract is about determinism, state and survival, not about fit quality.
FAST_DEEP_KERNEL = {"full_fit_steps": 20, "refine_steps": 5, "full_fits": 1, "learning_rate": 1e-2}


class TestDyHPOSurrogate(ExactGPContract):
    """The deep kernel as DyHPO: curve CNN, no weights; fits after the first warm-start."""

    def make_surrogate(self) -> Surrogate:
        return build_surrogate(
            "dyhpo", x_dim=self.x_dim, curve_length=self.curve_length, device="cpu", **FAST_DEEP_KERNEL
        )


class TestFMSSurrogateWithStatsFeaturizer(ExactGPContract):
    """The deep kernel as FMS: curve CNN and the statistics featurizer of the rows' weights."""

    with_weights = True

    def make_surrogate(self) -> Surrogate:
        featurizer = build_featurizer("stats", embedding_dim=4)
        return build_surrogate(
            "dyhpo",
            x_dim=self.x_dim,
            curve_length=self.curve_length,
            featurizer=featurizer,
            device="cpu",
            **FAST_DEEP_KERNEL,
        )


class TestPlainGPSurrogate(ExactGPContract):
    """The plain GP on ``[x, budget]``."""

    def make_surrogate(self) -> Surrogate:
        return build_surrogate("gp", x_dim=self.x_dim, curve_length=self.curve_length, device="cpu", steps=15)
