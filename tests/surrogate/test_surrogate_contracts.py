"""The shipped surrogate contract (lightning_fms.testing.surrogates) run against every surrogate."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from linear_operator.utils.errors import NotPSDError
from torch import Tensor

from lightning_fms.surrogate import Surrogate, SurrogateRows, build_surrogate
from lightning_fms.surrogate.deep_kernel import DeepKernelSurrogate
from lightning_fms.surrogate.exact_gp import NUMERICAL_ERRORS, ExactGPSurrogateBase
from lightning_fms.surrogate.plain_gp import PlainGPSurrogate
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


#: Small fits of the additive GP that still exercise its schedule (fresh, warm-started, periodic fresh refit).
FAST_ADDITIVE_GP = {"full_fit_steps": 15, "refine_steps": 5, "full_fits": 1, "refit_every": 3}


class TestAdditiveGPSurrogate(ExactGPContract):
    """The library default ``fms`` without weights: plain-GP kernel plus the learning-curve term."""

    def make_surrogate(self) -> Surrogate:
        return build_surrogate(
            "fms", x_dim=self.x_dim, curve_length=self.curve_length, device="cpu", **FAST_ADDITIVE_GP
        )


class TestAdditiveGPSurrogateWithWeights(ExactGPContract):
    """The library default ``fms`` with a weight term (statistics featurizer, used without training)."""

    with_weights = True

    def make_surrogate(self) -> Surrogate:
        featurizer = build_featurizer("stats", embedding_dim=4)
        return build_surrogate(
            "fms",
            x_dim=self.x_dim,
            curve_length=self.curve_length,
            featurizer=featurizer,
            device="cpu",
            **FAST_ADDITIVE_GP,
        )


class TestPlainGPSurrogate(ExactGPContract):
    """The plain GP on ``[x, budget]``."""

    def make_surrogate(self) -> Surrogate:
        return build_surrogate("gp", x_dim=self.x_dim, curve_length=self.curve_length, device="cpu", steps=15)


# ------------------------------------------------------------------ the suite rejects surrogates that break it

#: A deep kernel small enough to fit in milliseconds; it warm-starts from its second fit on.
TINY_DEEP_KERNEL = {
    "hidden": 8,
    "output_dim": 4,
    "full_fit_steps": 5,
    "refine_steps": 3,
    "full_fits": 1,
    "learning_rate": 1e-2,
}


class _SeedsFromTheGlobalGenerator(DeepKernelSurrogate):
    """Ignores ``seed``: draws the fit's seed from the caller's global generator (without moving it)."""

    def fit(self, rows: SurrogateRows, targets: Tensor, seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            drawn = int(torch.randint(2**31, ()))
        super().fit(rows, targets, seed=drawn)


class _DrawsFromTheCallersGenerator(DeepKernelSurrogate):
    """Seeds its fit properly but draws one number from the caller's generator first."""

    def fit(self, rows: SurrogateRows, targets: Tensor, seed: int) -> None:
        torch.rand(())
        super().fit(rows, targets, seed)


class _AnswersInAColumn(PlainGPSurrogate):
    """Answers ``[M, 1]`` instead of ``[M]``."""

    def posterior(self, rows: SurrogateRows) -> tuple[Tensor, Tensor]:
        mean, variance = super().posterior(rows)
        return mean[:, None], variance[:, None]


class _NormalisesWithQueryStatistics(PlainGPSurrogate):
    """Centres its inputs on a running mean that every call, queries included, moves."""

    def _inputs(self, rows: SurrogateRows, mu: float, std: float) -> Tensor:
        packed = super()._inputs(rows, mu, std)
        self.running_mean = 0.5 * getattr(self, "running_mean", torch.zeros_like(packed[0])) + 0.5 * packed.mean(0)
        return packed - self.running_mean


class _LoadsWithoutTheTargetScale(PlainGPSurrogate):
    """``load_state_dict`` drops the target standardisation (the answer comes back in standardised units)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict({**state, "y_mean": 0.0, "y_std": 1.0})


class _LoadsWithoutTheFitCount(DeepKernelSurrogate):
    """``load_state_dict`` drops the fit counts, so a restored surrogate fits from scratch where it should refine."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict({**state, "counts": {key: 0 for key in state["counts"]}})


class _LoadsTheFeaturizerOnlyOnceFitted(DeepKernelSurrogate):
    """Restores the featurizer only from a fitted state: an unfitted one keeps its own random initialisation."""

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state["model"]:
            super()._load_extra_state(state)


class _RefusesDuplicatedRows(PlainGPSurrogate):
    """Raises when a training configuration is observed twice at the same budget."""

    def fit(self, rows: SurrogateRows, targets: Tensor, seed: int) -> None:
        keys = torch.cat([rows.x, rows.budget[:, None]], -1)
        if len(torch.unique(keys, dim=0)) < len(keys):
            raise ValueError("duplicate rows")
        super().fit(rows, targets, seed)


class _SpreadOfOneTarget(PlainGPSurrogate):
    """After a one-row fit, answers with the targets' sample variance, which is NaN for one target."""

    def fit(self, rows: SurrogateRows, targets: Tensor, seed: int) -> None:
        super().fit(rows, targets, seed)
        if len(rows) == 1:
            self._prior_var = float(targets.double().std())


class _RaisesOnNumericalFailure(PlainGPSurrogate):
    """Fits once, without recovery: a numerical failure propagates."""

    def _fit_with_recovery(
        self, rows: SurrogateRows, y: Tensor, mu: float, std: float, seed: int, snapshot: dict[str, Any]
    ) -> dict[str, int]:
        self._attempt(rows, y, mu, std, seed, full=True, jitter=0.0)
        return {**self._counts, "fits": self._counts["fits"] + 1, "full": self._counts["full"] + 1}


class _NaNInsteadOfRecovering(PlainGPSurrogate):
    """Swallows a numerical failure and answers NaN until the next fit."""

    def _attempt(self, rows: SurrogateRows, y: Tensor, *args: Any, **kwargs: Any) -> None:
        try:
            super()._attempt(rows, y, *args, **kwargs)
        except NUMERICAL_ERRORS:
            self._mode, self._prior_mean = "prior", math.nan


class _StaysOnThePriorAfterAFailure(PlainGPSurrogate):
    """Once a fit fell back to the prior, later fits change nothing."""

    def fit(self, rows: SurrogateRows, targets: Tensor, seed: int) -> None:
        if not self.num_prior_fallbacks:
            super().fit(rows, targets, seed)


def contract_for(cls: type[ExactGPSurrogateBase], *, with_weights: bool = False) -> ExactGPContract:
    """The exact-GP contract run against ``cls`` (the tiny deep kernel or a fast plain GP)."""
    contract = ExactGPContract()
    contract.with_weights = with_weights  # type: ignore[misc]
    if issubclass(cls, DeepKernelSurrogate):
        featurizer = (lambda: build_featurizer("stats", embedding_dim=4)) if with_weights else (lambda: None)
        options = {"curve_length": contract.curve_length, **TINY_DEEP_KERNEL}
        contract.make_surrogate = lambda: cls(  # type: ignore[method-assign]
            x_dim=contract.x_dim, featurizer=featurizer(), device="cpu", **options
        )
    else:
        contract.make_surrogate = lambda: cls(x_dim=contract.x_dim, device="cpu", steps=5)  # type: ignore[method-assign]
    return contract


def test_the_suite_accepts_the_tiny_deep_kernel_it_breaks_below() -> None:
    """The broken surrogates below differ from this one only by their bug."""
    contract = contract_for(DeepKernelSurrogate)
    contract.test_same_seed_and_rows_give_the_same_posterior()
    contract.test_fit_leaves_the_callers_random_state_alone()
    contract.test_state_round_trip_warm_starts_the_same()
    contract_for(DeepKernelSurrogate, with_weights=True).test_unfitted_state_round_trips()


def test_the_suite_rejects_a_surrogate_seeded_by_the_caller() -> None:
    contract = contract_for(_SeedsFromTheGlobalGenerator)
    contract.test_fit_leaves_the_callers_random_state_alone()
    with pytest.raises(AssertionError, match="posterior means differ"):
        contract.test_same_seed_and_rows_give_the_same_posterior()


def test_the_suite_rejects_a_surrogate_that_moves_the_callers_generator() -> None:
    contract = contract_for(_DrawsFromTheCallersGenerator)
    contract.test_same_seed_and_rows_give_the_same_posterior()
    with pytest.raises(AssertionError):
        contract.test_fit_leaves_the_callers_random_state_alone()


def test_the_suite_rejects_a_surrogate_that_answers_in_the_wrong_shape() -> None:
    with pytest.raises(AssertionError, match=r"mean has shape \(\d+, 1\), expected \(\d+,\)"):
        contract_for(_AnswersInAColumn).test_posterior_has_one_finite_answer_per_row()


def test_the_suite_rejects_a_surrogate_whose_answers_depend_on_earlier_queries() -> None:
    contract = contract_for(_NormalisesWithQueryStatistics)
    contract.test_posterior_has_one_finite_answer_per_row()
    with pytest.raises(AssertionError, match="posterior means differ"):
        contract.test_posterior_does_not_depend_on_earlier_queries()


def test_the_suite_rejects_a_surrogate_that_loads_without_the_target_scale() -> None:
    contract = contract_for(_LoadsWithoutTheTargetScale)
    contract.test_state_round_trip_warm_starts_the_same()  # the next fit recomputes the scale
    contract.test_unfitted_state_round_trips()
    with pytest.raises(AssertionError, match="posterior means differ"):
        contract.test_state_round_trip_gives_the_same_posterior()


def test_the_suite_rejects_a_surrogate_that_loads_without_its_fit_count() -> None:
    contract = contract_for(_LoadsWithoutTheFitCount)
    contract.test_state_round_trip_gives_the_same_posterior()  # the posterior does not read the counts
    contract.test_unfitted_state_round_trips()
    with pytest.raises(AssertionError, match="posterior means differ"):
        contract.test_state_round_trip_warm_starts_the_same()


def test_the_suite_rejects_a_surrogate_whose_unfitted_state_does_not_load() -> None:
    contract = contract_for(_LoadsTheFeaturizerOnlyOnceFitted, with_weights=True)
    contract.test_state_round_trip_warm_starts_the_same()
    with pytest.raises(AssertionError, match=r"state\['featurizer'\]"):
        contract.test_unfitted_state_round_trips()


def test_the_suite_rejects_a_surrogate_that_refuses_duplicated_rows() -> None:
    contract = contract_for(_RefusesDuplicatedRows)
    contract.test_survives_a_single_row()
    with pytest.raises(ValueError, match="duplicate rows"):
        contract.test_survives_duplicated_rows_with_constant_targets()
    with pytest.raises(ValueError, match="duplicate rows"):
        contract.test_survives_conflicting_targets_at_the_same_row()


def test_the_suite_rejects_a_surrogate_that_answers_nan_after_one_row() -> None:
    contract = contract_for(_SpreadOfOneTarget)
    contract.test_survives_duplicated_rows_with_constant_targets()
    with pytest.raises(AssertionError, match="non-finite variance"):
        contract.test_survives_a_single_row()
    with pytest.raises(AssertionError):
        contract.test_fewer_than_two_rows_answer_with_the_prior()


def test_the_suite_rejects_a_surrogate_that_raises_on_a_numerical_failure() -> None:
    contract = contract_for(_RaisesOnNumericalFailure)
    contract.test_state_round_trip_gives_the_same_posterior()
    with pytest.raises(NotPSDError, match="injected by the surrogate contract"):
        contract.test_recovers_from_one_numerical_failure()
    with pytest.raises(NotPSDError, match="injected by the surrogate contract"):
        contract.test_survives_persistent_numerical_failure()


def test_the_suite_rejects_a_surrogate_that_answers_nan_instead_of_recovering() -> None:
    contract = contract_for(_NaNInsteadOfRecovering)
    contract.test_posterior_has_one_finite_answer_per_row()
    with pytest.raises(AssertionError, match="non-positive-definite covariance: non-finite mean"):
        contract.test_recovers_from_one_numerical_failure()
    with pytest.raises(AssertionError, match="non-positive-definite covariance: non-finite mean"):
        contract.test_survives_persistent_numerical_failure()


def test_the_suite_rejects_a_surrogate_that_stays_on_the_prior_after_a_failure() -> None:
    contract = contract_for(_StaysOnThePriorAfterAFailure)
    contract.test_recovers_from_one_numerical_failure()
    with pytest.raises(AssertionError, match="still answers"):
        contract.test_survives_persistent_numerical_failure()
