"""Contract tests that every :class:`~lightning_fms.surrogate.Surrogate` must pass, shipped for reuse.

Subclass :class:`SurrogateContract` (or :class:`ExactGPContract` for a subclass of
:class:`~lightning_fms.surrogate.exact_gp.ExactGPSurrogateBase`) in a test module, under a name that pytest
collects, and implement :meth:`~SurrogateContract.make_surrogate`::

    from lightning_fms.testing.surrogates import ExactGPContract

    class TestMySurrogate(ExactGPContract):
        def make_surrogate(self):
            return MySurrogate(x_dim=self.x_dim, curve_length=self.curve_length, steps=10, device="cpu")

The suite checks what the searcher relies on:

* **determinism**: surrogates built under the same global seed and fitted on the same rows with the same
  ``seed`` answer the same posterior, bit for bit, whatever the global random state at the fit; ``fit``
  leaves the caller's random state alone, and a query does not change later answers;
* **state round trip**: a surrogate built under *another* global seed that loads the state (after
  ``torch.save`` / ``torch.load(weights_only=True)``) answers the same posterior, and warm-starts the same
  way: the next fit gives the same posterior and the same state;
* **survival**: degenerate data (duplicated rows, constant targets, conflicting targets at the same row,
  a single row) and injected numerical failures (:meth:`~SurrogateContract.numerical_failures`) never
  raise, and the posterior stays finite with a positive variance.

Keep the surrogate small in ``make_surrogate`` (a few optimiser steps): the suite fits a few dozen times.
The data come from :func:`learning_curve_rows`, which the surrogate's own tests may use as well.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar
from unittest import mock

import torch
from linear_operator.utils.errors import NotPSDError
from torch import Tensor, nn

from lightning_fms.surrogate import Surrogate, SurrogateRows, exact_gp
from lightning_fms.surrogate.exact_gp import ExactGPSurrogateBase

__all__ = [
    "ExactGPContract",
    "SurrogateContract",
    "assert_answers",
    "assert_same_posterior",
    "assert_same_state",
    "failing_cholesky",
    "learning_curve_rows",
    "nan_likelihood",
    "random_linears",
    "select_rows",
    "weights_only_round_trip",
    "with_modules",
]

#: Failures injected by a "persistent" failure: more than any fit can consume.
PERSISTENT = 10**9


def learning_curve_rows(
    n_configs: int, seed: int, *, x_dim: int = 3, curve_length: int = 8, with_weights: bool = False
) -> tuple[SurrogateRows, Tensor]:
    """Training rows of ``n_configs`` synthetic trials, one row per (configuration, epoch), as DyHPO sees them.

    Trial ``i`` has a configuration ``x_i`` drawn uniformly from the unit cube and ran a random number of
    epochs (1 to ``curve_length``); its score at epoch ``k`` is ``0.4 * x_i[0] + 0.6 * (1 - exp(-k / 3))``
    plus a little noise. The row that predicts epoch ``k`` sees the curve up to ``k - 1``.

    Args:
        n_configs: Number of trials.
        seed: Seeds everything drawn (the global random state is left alone).
        x_dim: Number of encoded hyperparameters ``D``.
        curve_length: The per-trial epoch cap ``L``.
        with_weights: Give every trial a small ``nn.Linear(4, 2)`` with its own random weights and the key
            ``"rows{seed}-{i}"`` (rows of trial ``i`` point at module ``i``).

    Returns:
        ``(rows, targets)``: ``N`` rows (``x [N, D]``, ``budget [N]``, ``curves [N, L]``) and their
        scores, float32 of shape ``[N]``.

    """
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(n_configs, x_dim, generator=g)
    last = torch.randint(1, curve_length + 1, (n_configs,), generator=g)
    rows_x, budget, curves, lengths, targets, weight_index = [], [], [], [], [], []
    for i in range(n_configs):
        epochs = torch.arange(1, int(last[i]) + 1, dtype=torch.float32)
        curve = 0.4 * xs[i, 0] + 0.6 * (1.0 - torch.exp(-epochs / 3.0)) + 0.005 * torch.randn(len(epochs), generator=g)
        for k in range(1, int(last[i]) + 1):
            rows_x.append(xs[i])
            budget.append(k / curve_length)
            padded = torch.zeros(curve_length)
            padded[: k - 1] = curve[: k - 1]
            curves.append(padded)
            lengths.append(k - 1)
            targets.append(curve[k - 1])
            weight_index.append(i)
    rows = SurrogateRows(
        x=torch.stack(rows_x),
        budget=torch.tensor(budget),
        curves=torch.stack(curves),
        curve_lengths=torch.tensor(lengths),
    )
    if with_weights:
        rows = with_modules(rows, torch.tensor(weight_index), random_linears(n_configs, 1000 + seed), f"rows{seed}")
    return rows, torch.stack(targets)


def random_linears(n: int, seed: int) -> list[nn.Module]:
    """``n`` modules ``nn.Linear(4, 2)`` with weights of different scales, drawn from a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    modules = []
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own initialisation draws from the global generator
        for _ in range(n):
            module = nn.Linear(4, 2)
            with torch.no_grad():
                module.weight.copy_(torch.randn(2, 4, generator=g) * float(torch.rand(1, generator=g) * 3))
                module.bias.copy_(torch.randn(2, generator=g))
            modules.append(module)
    return modules


def with_modules(rows: SurrogateRows, index: Tensor, modules: Sequence[nn.Module], prefix: str) -> SurrogateRows:
    """``rows`` pointing at ``modules`` (row ``j`` at ``modules[index[j]]``), keyed ``"{prefix}-{i}"``."""
    return SurrogateRows(
        x=rows.x,
        budget=rows.budget,
        curves=rows.curves,
        curve_lengths=rows.curve_lengths,
        weight_index=index,
        weights=list(modules),
        weight_keys=[f"{prefix}-{i}" for i in range(len(modules))],
    )


def select_rows(rows: SurrogateRows, index: Tensor) -> SurrogateRows:
    """The rows at ``index`` (shape ``[M]``, long; repeats allowed), with the same modules and keys."""
    return SurrogateRows(
        x=rows.x[index],
        budget=rows.budget[index],
        curves=rows.curves[index],
        curve_lengths=rows.curve_lengths[index],
        weight_index=None if rows.weight_index is None else rows.weight_index[index],
        weights=rows.weights,
        weight_keys=rows.weight_keys,
        reference_index=rows.reference_index,
    )


def weights_only_round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` after ``torch.save`` and ``torch.load(weights_only=True)`` (fails on anything but plain data)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_posterior(first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor], context: str = "") -> None:
    """Assert two ``(mean, variance)`` answers are equal bit for bit (``context`` prefixes the message)."""
    for name, a, b in zip(("mean", "variance"), first, second, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{context}posterior {name}s differ: {a} != {b}"


def assert_same_state(first: Any, second: Any, path: str = "state") -> None:
    """Assert two state dicts (tensors, dicts, lists, scalars) are equal, tensors bit for bit."""
    if isinstance(first, Tensor):
        assert isinstance(second, Tensor) and first.dtype == second.dtype, f"{path}: {second!r} != {first!r}"
        assert torch.equal(first, second), f"{path} differs"
    elif isinstance(first, dict):
        assert isinstance(second, dict) and set(first) == set(second), f"{path}: keys differ"
        for key in first:
            assert_same_state(first[key], second[key], f"{path}[{key!r}]")
    elif isinstance(first, (list, tuple)):
        assert isinstance(second, (list, tuple)) and len(first) == len(second), f"{path}: lengths differ"
        for i, (a, b) in enumerate(zip(first, second, strict=True)):
            assert_same_state(a, b, f"{path}[{i}]")
    else:
        assert first == second, f"{path}: {second!r} != {first!r}"


def assert_answers(mean: Tensor, variance: Tensor, m: int, context: str = "") -> None:
    """Assert a posterior answer for ``m`` rows: two CPU float tensors ``[m]``, finite, variance positive."""
    for name, value in (("mean", mean), ("variance", variance)):
        assert value.shape == (m,), f"{context}{name} has shape {tuple(value.shape)}, expected ({m},)"
        assert value.device.type == "cpu" and value.is_floating_point(), f"{context}{name}: {value.device}"
        assert bool(torch.isfinite(value).all()), f"{context}non-finite {name}: {value}"
    assert bool((variance > 0).all()), f"{context}non-positive variance: {variance}"


class SurrogateContract:
    """The contract suite; subclass it, name the subclass ``Test...`` and implement :meth:`make_surrogate`.

    Attributes:
        x_dim: Width ``D`` of the rows' ``x``.
        curve_length: Curve width ``L`` of the rows.
        with_weights: Whether rows carry weight modules (a surrogate with a featurizer needs them).

    """

    x_dim: ClassVar[int] = 3
    curve_length: ClassVar[int] = 6
    with_weights: ClassVar[bool] = False

    # ------------------------------------------------------------------ hooks

    def make_surrogate(self) -> Surrogate:
        """A new surrogate for rows of width :attr:`x_dim` and :attr:`curve_length` (keep its fits small).

        It may draw from torch's global generator (for example to initialise a featurizer); the suite
        seeds that generator before every call.
        """
        raise NotImplementedError

    def numerical_failures(self) -> dict[str, Callable[[int], AbstractContextManager[Any]]]:
        """Named ways to make a fit fail numerically, for the recovery tests (none by default: they are skipped).

        Each maps ``failures`` to a context manager inside which the surrogate's next ``failures``
        numerical steps fail the way that name says (a surrogate counts its steps as it likes).
        """
        return {}

    def check_recovered(self, surrogate: Surrogate) -> None:
        """Further checks after a fit that met one injected failure (none by default)."""

    def check_failed(self, surrogate: Surrogate, targets: Tensor, mean: Tensor, variance: Tensor) -> None:
        """Further checks after a fit that met only failures, given its posterior (none by default)."""

    # ------------------------------------------------------------------ helpers

    def build(self, construction_seed: int = 0) -> Surrogate:
        """:meth:`make_surrogate` with torch's global generator seeded by ``construction_seed`` in a fork."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(construction_seed)
            return self.make_surrogate()

    def rows(self, n_configs: int, seed: int) -> tuple[SurrogateRows, Tensor]:
        """:func:`learning_curve_rows` with this suite's widths."""
        return learning_curve_rows(
            n_configs, seed, x_dim=self.x_dim, curve_length=self.curve_length, with_weights=self.with_weights
        )

    def _failures(self) -> dict[str, Callable[[int], AbstractContextManager[Any]]]:
        failures = self.numerical_failures()
        if not failures:
            import pytest  # only the recovery tests need pytest, and only to skip

            pytest.skip(f"{type(self).__name__} injects no numerical failures (see numerical_failures)")
        return failures

    def restored(self, surrogate: Surrogate, construction_seed: int = 1) -> Surrogate:
        """A surrogate built under another global seed that loaded ``surrogate``'s state (saved and loaded)."""
        other = self.build(construction_seed)
        other.load_state_dict(weights_only_round_trip(surrogate.state_dict()))
        return other

    # ------------------------------------------------------------------ determinism

    def test_posterior_has_one_finite_answer_per_row(self) -> None:
        """A fitted surrogate answers ``[M]`` CPU means and variances, finite, variances positive."""
        train, y = self.rows(6, seed=0)
        test, _ = self.rows(4, seed=1)
        surrogate = self.build()
        surrogate.fit(train, y, seed=0)
        assert_answers(*surrogate.posterior(test), len(test))

    def test_same_seed_and_rows_give_the_same_posterior(self) -> None:
        """Same construction seed, rows and fit ``seed`` give the same posterior bit for bit."""
        train, y = self.rows(6, seed=0)
        test, _ = self.rows(4, seed=1)
        answers = []
        for global_seed in (100, 200):  # the fit's randomness comes from ``seed``, not from the caller's state
            surrogate = self.build()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(global_seed)
                surrogate.fit(train, y, seed=7)
            answers.append(surrogate.posterior(test))
        assert_same_posterior(answers[0], answers[1])

    def test_fit_leaves_the_callers_random_state_alone(self) -> None:
        """``fit`` leaves torch's global generator as it found it."""
        train, y = self.rows(6, seed=0)
        surrogate = self.build()
        before = torch.get_rng_state()
        surrogate.fit(train, y, seed=3)
        assert torch.equal(before, torch.get_rng_state())

    def test_posterior_does_not_depend_on_earlier_queries(self) -> None:
        """Asking about other rows first does not change an answer."""
        train, y = self.rows(6, seed=0)
        test, _ = self.rows(4, seed=1)
        other, _ = self.rows(5, seed=2)
        surrogate = self.build()
        surrogate.fit(train, y, seed=0)
        first = surrogate.posterior(test)
        surrogate.posterior(other)
        assert_same_posterior(first, surrogate.posterior(test))

    # ------------------------------------------------------------------ state round trip

    def test_state_round_trip_gives_the_same_posterior(self) -> None:
        """A differently built surrogate that loads the state answers the same, bit for bit."""
        train, y = self.rows(6, seed=0)
        more, y_more = self.rows(8, seed=2)
        test, _ = self.rows(4, seed=1)
        surrogate = self.build()
        surrogate.fit(train, y, seed=0)
        surrogate.fit(more, y_more, seed=1)  # a second fit (a warm start where the surrogate has one)
        surrogate.posterior(train)  # a query before saving must not change the state
        restored = self.restored(surrogate)
        assert_same_posterior(surrogate.posterior(test), restored.posterior(test))

    def test_state_round_trip_warm_starts_the_same(self) -> None:
        """After loading the state, the next fit gives the same posterior and the same state."""
        train, y = self.rows(6, seed=0)
        more, y_more = self.rows(8, seed=2)
        test, _ = self.rows(4, seed=1)
        surrogate = self.build()
        surrogate.fit(train, y, seed=0)
        restored = self.restored(surrogate)
        for fitted in (surrogate, restored):
            fitted.fit(more, y_more, seed=1)
        assert_same_posterior(surrogate.posterior(test), restored.posterior(test))
        assert_same_state(surrogate.state_dict(), restored.state_dict())

    def test_unfitted_state_round_trips(self) -> None:
        """An unfitted surrogate's state loads too, and both answer the same."""
        test, _ = self.rows(4, seed=1)
        surrogate = self.build()
        restored = self.restored(surrogate)
        assert_same_state(surrogate.state_dict(), restored.state_dict())
        assert_same_posterior(surrogate.posterior(test), restored.posterior(test))

    # ------------------------------------------------------------------ survival

    def test_survives_duplicated_rows_with_constant_targets(self) -> None:
        """Every row twice with one constant target: a finite answer, the mean at that constant."""
        train, _ = self.rows(4, seed=3)
        doubled = select_rows(train, torch.arange(len(train)).repeat(2))
        surrogate = self.build()
        surrogate.fit(doubled, torch.full((len(doubled),), 0.25), seed=0)
        mean, variance = surrogate.posterior(train)
        assert_answers(mean, variance, len(train))
        assert torch.allclose(mean, torch.full_like(mean, 0.25), atol=1e-6), mean

    def test_survives_conflicting_targets_at_the_same_row(self) -> None:
        """One row observed with different targets: a finite answer."""
        train, _ = self.rows(4, seed=3)
        same = select_rows(train, torch.zeros(6, dtype=torch.long))
        surrogate = self.build()
        surrogate.fit(same, torch.tensor([0.1, 0.9, 0.5, 0.2, 0.8, 0.4]), seed=0)
        assert_answers(*surrogate.posterior(train), len(train))

    def test_survives_a_single_row(self) -> None:
        """A fit on one row: a finite answer."""
        train, y = self.rows(4, seed=3)
        surrogate = self.build()
        surrogate.fit(select_rows(train, torch.tensor([2])), y[2:3], seed=0)
        assert_answers(*surrogate.posterior(train), len(train))

    def test_recovers_from_one_numerical_failure(self) -> None:
        """Each injected failure, once: ``fit`` does not raise and the answer is finite and round-trips."""
        train, y = self.rows(6, seed=0)
        test, _ = self.rows(4, seed=1)
        for name, failure in self._failures().items():
            surrogate = self.build()
            with failure(1):
                surrogate.fit(train, y, seed=0)
            assert_answers(*surrogate.posterior(test), len(test), f"{name}: ")
            self.check_recovered(surrogate)
            assert_same_posterior(surrogate.posterior(test), self.restored(surrogate).posterior(test), f"{name}: ")

    def test_survives_persistent_numerical_failure(self) -> None:
        """Each injected failure, always: no raise, a finite answer that round-trips; fitting works afterwards."""
        train, y = self.rows(6, seed=0)
        test, _ = self.rows(4, seed=1)
        for name, failure in self._failures().items():
            surrogate = self.build()
            with failure(PERSISTENT):
                surrogate.fit(train, y, seed=0)
                mean, variance = surrogate.posterior(test)
            assert_answers(mean, variance, len(test), f"{name}: ")
            self.check_failed(surrogate, y, mean, variance)
            assert_same_posterior((mean, variance), self.restored(surrogate).posterior(test), f"{name}: ")
            surrogate.fit(train, y, seed=1)  # the failure is gone: fitting works again
            refitted = surrogate.posterior(test)
            assert_answers(*refitted, len(test), f"{name}: ")
            assert not torch.equal(refitted[0], mean), f"{name}: still answers as after the failed fit: {mean}"


@contextmanager
def failing_cholesky(failures: int) -> Iterator[None]:
    """Make the next ``failures`` Cholesky factorisations of an exact-GP posterior raise ``NotPSDError``.

    Every fit attempt of :class:`~lightning_fms.surrogate.exact_gp.ExactGPSurrogateBase` factors the
    training covariance once, so one failure fails the first attempt and two fail its retry too.
    """
    original = exact_gp.psd_safe_cholesky
    left = [int(failures)]

    def cholesky(matrix: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if left[0] > 0:
            left[0] -= 1
            raise NotPSDError("injected by the surrogate contract: matrix is not positive definite")
        return original(matrix, *args, **kwargs)

    with mock.patch.object(exact_gp, "psd_safe_cholesky", cholesky):
        yield


@contextmanager
def nan_likelihood(failures: int) -> Iterator[None]:
    """Make the next ``failures`` training losses of an exact-GP surrogate NaN (one per Adam step)."""
    original = ExactGPSurrogateBase._negative_mll
    left = [int(failures)]

    def negative_mll(self: ExactGPSurrogateBase, *args: Any) -> Tensor:
        loss = original(self, *args)
        if left[0] > 0:
            left[0] -= 1
            return loss * math.nan
        return loss

    with mock.patch.object(ExactGPSurrogateBase, "_negative_mll", negative_mll):
        yield


class ExactGPContract(SurrogateContract):
    """:class:`SurrogateContract` for exact-GP surrogates, with their recovery promises and the prior.

    After one failure the fit reverts and retries a full fit with a larger jitter, which succeeds; after
    failures only it answers with the prior (the training targets' mean and variance); with fewer than
    two rows it answers with the prior (the single target, or 0, with variance 1).
    """

    def numerical_failures(self) -> dict[str, Callable[[int], AbstractContextManager[Any]]]:
        """A non-positive-definite training covariance and a NaN training loss."""
        return {"non-positive-definite covariance": failing_cholesky, "NaN marginal likelihood": nan_likelihood}

    def check_recovered(self, surrogate: Surrogate) -> None:
        """One recovery, no fallback to the prior, and the answer comes from a fitted model."""
        assert isinstance(surrogate, ExactGPSurrogateBase)
        assert (surrogate.num_recoveries, surrogate.num_prior_fallbacks) == (1, 0)
        assert not surrogate.answers_with_prior

    def check_failed(self, surrogate: Surrogate, targets: Tensor, mean: Tensor, variance: Tensor) -> None:
        """One recovery, one fallback: the answer is the training targets' mean and variance."""
        assert isinstance(surrogate, ExactGPSurrogateBase)
        assert (surrogate.num_recoveries, surrogate.num_prior_fallbacks) == (1, 1)
        assert surrogate.answers_with_prior
        values = targets.double()
        assert torch.allclose(mean, torch.full_like(mean, float(values.mean())))
        assert torch.allclose(variance, torch.full_like(variance, float(values.std()) ** 2))

    def test_fewer_than_two_rows_answer_with_the_prior(self) -> None:
        """Unfitted: mean 0, variance 1; after a one-row fit: that target, variance 1."""
        train, y = self.rows(4, seed=3)
        surrogate = self.build()
        assert isinstance(surrogate, ExactGPSurrogateBase)
        mean, variance = surrogate.posterior(train)
        assert torch.equal(mean, torch.zeros(len(train), dtype=torch.float64))
        assert torch.equal(variance, torch.ones(len(train), dtype=torch.float64))
        surrogate.fit(select_rows(train, torch.tensor([2])), y[2:3], seed=0)
        mean, variance = surrogate.posterior(train)
        assert torch.equal(mean, torch.full((len(train),), float(y[2]), dtype=torch.float64))
        assert torch.equal(variance, torch.ones(len(train), dtype=torch.float64))
        assert surrogate.answers_with_prior and surrogate.num_fits == 0
