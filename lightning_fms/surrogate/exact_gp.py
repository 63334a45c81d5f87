"""The exact-GP machinery shared by the deep-kernel GP and the plain GP.

:class:`ExactGPSurrogateBase` holds what both surrogates do the same way: target standardisation,
seeded fits that leave the caller's RNG alone, full-batch Adam on the exact marginal log-likelihood,
recovery from numerical failures (revert to the parameters from before the fit, retry once as a full fit
with a larger Cholesky jitter and, if that fails too, answer with the prior), the query-independent exact
posterior and the state-dict format. :class:`ExactGPModel` is the GPyTorch model both build: an optional
feature map, then ``ConstantMean`` and a scaled kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import gpytorch
import torch
from linear_operator.utils.cholesky import psd_safe_cholesky
from linear_operator.utils.errors import NanError, NotPSDError
from torch import Tensor, nn

from lightning_fms.surrogate._base import Surrogate, SurrogateRows
from lightning_fms.surrogate.numerics import (
    check_finite,
    cpu_state_dict,
    gp_settings,
    resolve_device,
    seeded,
    standardiser,
)

logger = logging.getLogger(__name__)

#: Cholesky jitter (in standardised target units) of the one retry after a numerical failure.
RECOVERY_JITTER = 1e-4
#: Smallest variance ``posterior`` returns.
MIN_VARIANCE = 1e-12


class NumericalFailure(RuntimeError):
    """A non-finite loss, parameter or posterior cache met during a fit."""


#: Everything a fit step may raise that triggers recovery instead of propagating.
NUMERICAL_ERRORS: tuple[type[BaseException], ...] = (NotPSDError, NanError, torch.linalg.LinAlgError, NumericalFailure)


class ExactGPModel(gpytorch.models.ExactGP):
    """``ConstantMean`` + ``ScaleKernel(base_kernel)`` on the output of an optional feature map.

    Args:
        train_inputs: Packed training inputs ``[N, P]``.
        train_targets: Standardised training targets ``[N]``.
        likelihood: The Gaussian observation likelihood.
        base_kernel: The kernel that ``ScaleKernel`` scales, on features ``[N, F]``.
        extractor: Maps packed inputs ``[N, P]`` to the kernel's features ``[N, F]`` and is trained
            with the GP (the deep kernel); ``None`` puts the kernel on the packed inputs (``F = P``).

    """

    def __init__(
        self,
        train_inputs: Tensor,
        train_targets: Tensor,
        likelihood: gpytorch.likelihoods.GaussianLikelihood,
        base_kernel: gpytorch.kernels.Kernel,
        extractor: nn.Module | None = None,
    ) -> None:
        super().__init__(train_inputs, train_targets, likelihood)
        self.extractor = extractor
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(base_kernel)

    def features(self, packed: Tensor) -> Tensor:
        """The kernel's input ``[N, F]`` for packed inputs ``[N, P]``."""
        return packed if self.extractor is None else self.extractor(packed)

    def forward(self, packed: Tensor) -> gpytorch.distributions.MultivariateNormal:
        """Prior over packed inputs ``[N, P]``."""
        features = self.features(packed)
        return gpytorch.distributions.MultivariateNormal(self.mean_module(features), self.covar_module(features))


class ExactGPSurrogateBase(Surrogate):
    """Shared fit/posterior/state machinery of the exact-GP surrogates (not a public surrogate itself).

    Subclasses provide the model (an :class:`ExactGPModel`), the input packing, further checks of
    their rows and the training loop (built on :meth:`_maximise_likelihood`). The posterior is
    computed here from the model's modules with an explicit Cholesky factor of the training
    covariance so that its value depends only on the fitted state and the queried rows (GPyTorch's
    joint train/test kernel evaluation centres the distance computation on the *joint* inputs,
    which makes the last bits depend on the query batch).

    Posterior variances are those of the latent function ``f`` (no observation noise): the
    acquisition asks how good the *true* score could be, not how noisy one measurement is.

    Args:
        x_dim: Number of encoded hyperparameters ``D`` of the rows.
        curve_length: Curve width ``L`` of the rows (the per-trial epoch cap).
        device: Where to fit; ``None`` picks CUDA when available, else the CPU.
        dtype: ``torch.float32`` or ``torch.float64``.

    """

    _FORMAT = "exact_gp/1"

    def __init__(self, *, x_dim: int, curve_length: int, device: str | torch.device | None, dtype: torch.dtype) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if x_dim < 0 or curve_length < 0:
            raise ValueError(f"x_dim and curve_length must be >= 0, got {x_dim} and {curve_length}")
        self.x_dim = int(x_dim)
        self.curve_length = int(curve_length)
        self.device = resolve_device(device)
        self.dtype = dtype
        self._model: ExactGPModel | None = None
        self._train_inputs: Tensor | None = None
        self._train_targets: Tensor | None = None
        self._y_mean = 0.0
        self._y_std = 1.0
        self._mode = "empty"  # "empty" (never fitted), "prior" (answer with the prior) or "model"
        self._prior_mean = 0.0
        self._prior_var = 1.0
        self._jitter = 0.0
        self._force_full = False
        self._counts = {"fits": 0, "full": 0, "refine": 0, "recoveries": 0, "prior_fallbacks": 0}
        self._cache: tuple[Tensor, Tensor, Tensor] | None = None
        self._initial_parameters: dict[str, Tensor] | None = None
        self._initial_fit_steps: int | None = None

    # ------------------------------------------------------------------ where fresh fits start

    def set_initial_parameters(self, parameters: dict[str, Tensor] | None, fit_steps: int | None = None) -> None:
        """Start every later fresh fit from ``parameters`` (a subset of the model's state dict; ``None``: default).

        Args:
            parameters: State-dict name -> tensor (``None`` or empty: the default initialisation again).
            fit_steps: Adam steps of a fresh fit from these parameters (``None``: the surrogate's full-fit steps).

        Raises:
            ValueError: a name the model does not have, or a tensor of another shape.
        """
        reference = self._probe_model().state_dict() if parameters else {}
        for name, value in (parameters or {}).items():
            if name not in reference or tuple(value.shape) != tuple(reference[name].shape):
                found = "not a parameter" if name not in reference else f"of shape {tuple(value.shape)}, not the shape"
                raise ValueError(f"initial parameter {name!r} is {found} of {type(self).__name__}'s model")
        self._initial_parameters = {k: v.detach().cpu().clone() for k, v in parameters.items()} if parameters else None
        self._initial_fit_steps = None if fit_steps is None or not parameters else int(fit_steps)

    def _fresh_fit_steps(self, default: int) -> int:
        """Steps of a fresh fit: ``default``, or those given with the initial parameters."""
        return default if self._initial_fit_steps is None else self._initial_fit_steps

    def _probe_model(self) -> ExactGPModel:
        """A model built on two dummy rows (to read its parameter names and shapes), without touching the RNG."""
        with seeded(0, self.device):
            zeros = torch.zeros(2, self.packed_width(), dtype=self.dtype, device=self.device)
            return self._build_model(zeros, zeros[:, 0])

    def packed_width(self) -> int:
        """Width ``P`` of the packed model inputs."""
        raise NotImplementedError

    def x_column_parameters(self) -> dict[str, int]:
        """Model parameters (state-dict names) with one entry per column of ``rows.x`` along an axis: name -> axis.

        The first ``x_dim`` entries along that axis belong to the columns of ``rows.x``, in order; what follows
        (the budget, ...) does not depend on the space. A prior (:mod:`lightning_fms.transfer`) lays learned values
        onto another space's columns by matching them by name.
        """
        return {}

    def _fresh_model(self, train_inputs: Tensor, train_targets: Tensor) -> ExactGPModel:
        """:meth:`_build_model`, then the parameters given to :meth:`set_initial_parameters` loaded over it."""
        model = self._build_model(train_inputs, train_targets)
        if self._initial_parameters:
            model.load_state_dict(
                {
                    k: v.to(self.device, self.dtype) if v.is_floating_point() else v
                    for k, v in self._initial_parameters.items()
                },
                strict=False,
            )
        return model

    # ------------------------------------------------------------------ subclass hooks

    def _config(self) -> dict[str, Any]:
        """Structural settings that a loaded state must match."""
        raise NotImplementedError

    def _build_model(self, train_inputs: Tensor, train_targets: Tensor) -> ExactGPModel:
        """Build a freshly initialised model on ``self.device`` in ``self.dtype`` (draws from the global RNG)."""
        raise NotImplementedError

    def _inputs(self, rows: SurrogateRows, mu: float, std: float) -> Tensor:
        """Packed model inputs ``[N, P]`` of ``rows`` for prediction (eval mode, no gradients)."""
        raise NotImplementedError

    def _train(self, rows: SurrogateRows, targets: Tensor, mu: float, std: float, full: bool) -> Tensor:
        """Train ``self._model`` (building it first when ``full``) and return the final packed inputs ``[N, P]``."""
        raise NotImplementedError

    def _wants_full_fit(self) -> bool:
        """Whether the next fit starts from a fresh initialisation (always, unless overridden)."""
        return True

    def _extra_state(self) -> dict[str, Any]:
        """Entries a subclass adds to :meth:`state_dict`."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` added."""
        return None

    def _set_eval(self) -> None:
        """Put every trained module in eval mode."""
        assert self._model is not None
        self._model.eval()

    # ------------------------------------------------------------------ introspection

    @property
    def num_fits(self) -> int:
        """Fits that trained the GP (calls of ``fit`` with at least two rows)."""
        return self._counts["fits"]

    @property
    def num_full_fits(self) -> int:
        """Successful fits that started from a fresh initialisation (recovery retries included)."""
        return self._counts["full"]

    @property
    def num_refine_fits(self) -> int:
        """Successful warm-started fits."""
        return self._counts["refine"]

    @property
    def num_recoveries(self) -> int:
        """Fits that met a numerical failure and were retried from scratch with a larger jitter."""
        return self._counts["recoveries"]

    @property
    def num_prior_fallbacks(self) -> int:
        """Fits whose retry failed too, so that ``posterior`` answered with the prior."""
        return self._counts["prior_fallbacks"]

    @property
    def answers_with_prior(self) -> bool:
        """Whether ``posterior`` currently returns the prior (no fit yet, fewer than 2 rows, or a failed fit)."""
        return self._mode != "model"

    # ------------------------------------------------------------------ fit

    def _validate(self, rows: SurrogateRows) -> None:
        """Raise ``ValueError`` on rows this surrogate cannot read (extended by subclasses)."""
        if rows.x.shape[1] != self.x_dim:
            raise ValueError(f"rows.x must have {self.x_dim} columns, got {rows.x.shape[1]}")
        check_finite("rows.x", rows.x)
        check_finite("rows.budget", rows.budget)

    def fit(self, rows: SurrogateRows, targets: Tensor, seed: int) -> None:
        """Condition on ``rows`` and their observed scores.

        Args:
            rows: ``N`` training rows.
            targets: Observed scores, shape ``[N]``, finite.
            seed: Seeds every random choice of this fit (initialisation, anything stochastic in training).

        Raises:
            ValueError: On malformed input (wrong shapes, non-finite targets). Numerical failures
                never raise; see the class docstring.

        """
        n = len(rows)
        if targets.shape != (n,):
            raise ValueError(f"targets must have shape [{n}], got {tuple(targets.shape)}")
        check_finite("targets", targets)
        self._validate(rows)
        self._cache = None
        if n < 2:
            self._mode = "prior"
            self._prior_mean = float(targets[0]) if n == 1 else 0.0
            self._prior_var = 1.0
            return

        mu, std = standardiser(targets)
        y = ((targets.detach().to(torch.float64) - mu) / std).to(self.device, self.dtype)
        snapshot = self.state_dict()
        try:
            self._counts = self._fit_with_recovery(rows, y, mu, std, seed, snapshot)
        except BaseException:  # a bug or an interrupt: leave the surrogate as it was before this fit
            self.load_state_dict(snapshot)
            raise

    def _fit_with_recovery(
        self, rows: SurrogateRows, y: Tensor, mu: float, std: float, seed: int, snapshot: dict[str, Any]
    ) -> dict[str, int]:
        """Fit; on a numerical failure revert, retry a full fit with more jitter, else fall back to the prior."""
        n = len(rows)
        counts = dict(self._counts)
        counts["fits"] += 1
        full = self._wants_full_fit()
        try:
            self._attempt(rows, y, mu, std, seed, full=full, jitter=0.0)
            counts["full" if full else "refine"] += 1
        except NUMERICAL_ERRORS as first:
            counts["recoveries"] += 1
            logger.warning(
                "%s: numerical failure in a %s fit on %d rows (%s: %s); reverting and retrying a full fit with "
                "Cholesky jitter %g",
                type(self).__name__,
                "full" if full else "refine",
                n,
                type(first).__name__,
                first,
                RECOVERY_JITTER,
            )
            self.load_state_dict(snapshot)
            try:
                self._attempt(rows, y, mu, std, seed, full=True, jitter=RECOVERY_JITTER)
                counts["full"] += 1
            except NUMERICAL_ERRORS as second:
                counts["prior_fallbacks"] += 1
                logger.warning(
                    "%s: the retry failed as well (%s: %s); answering with the prior until the next fit",
                    type(self).__name__,
                    type(second).__name__,
                    second,
                )
                self.load_state_dict(snapshot)
                self._mode = "prior"
                self._prior_mean = mu
                self._prior_var = std**2
                self._force_full = True
        return counts

    def _attempt(
        self, rows: SurrogateRows, y: Tensor, mu: float, std: float, seed: int, *, full: bool, jitter: float
    ) -> None:
        with seeded(seed, self.device), gp_settings(jitter):
            packed = self._train(rows, y, mu, std, full or self._model is None)
            self._set_eval()
            with torch.no_grad():
                cache = self._compute_cache(packed, y)
        self._train_inputs = packed
        self._train_targets = y
        self._y_mean, self._y_std = mu, std
        self._mode = "model"
        self._jitter = jitter
        self._force_full = False
        self._cache = cache

    def _maximise_likelihood(
        self,
        inputs: Callable[[], Tensor],
        targets: Tensor,
        steps: int,
        lr: float,
        extra_parameters: Sequence[nn.Parameter] = (),
    ) -> None:
        """Train ``self._model`` (and ``extra_parameters``) on the exact marginal log-likelihood.

        Args:
            inputs: Called once per step for the packed training inputs ``[N, P]`` (a feature map
                outside the model, such as a featurizer, recomputes them every step).
            targets: Standardised training targets ``[N]``.
            steps: Full-batch Adam steps.
            lr: Adam learning rate.
            extra_parameters: Parameters trained jointly that are not the model's.

        """
        model = self._model
        assert model is not None
        model.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        parameters = list(model.parameters()) + list(extra_parameters)
        self._optimise(parameters, lambda: self._negative_mll(mll, inputs(), targets), steps, lr)

    def _negative_mll(self, mll: gpytorch.mlls.ExactMarginalLogLikelihood, inputs: Tensor, targets: Tensor) -> Tensor:
        """Negative exact marginal log-likelihood (per row) of one full-batch training step."""
        assert self._model is not None
        return -mll(self._model(inputs), targets)

    def _optimise(self, parameters: list[nn.Parameter], loss_fn: Callable[[], Tensor], steps: int, lr: float) -> None:
        """Full-batch Adam on ``parameters``; raise :class:`NumericalFailure` on a non-finite loss or parameter."""
        optimiser = torch.optim.Adam(parameters, lr=lr)
        for step in range(steps):
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn()
            if not bool(torch.isfinite(loss)):
                raise NumericalFailure(f"non-finite negative marginal log-likelihood at step {step}")
            loss.backward()
            optimiser.step()
        for parameter in parameters:
            if not bool(torch.isfinite(parameter).all()):
                raise NumericalFailure("non-finite parameter after training")

    # ------------------------------------------------------------------ posterior

    def _compute_cache(self, packed: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training features ``[N, F]``, Cholesky factor ``[N, N]`` of ``K + noise I`` and ``alpha [N]``."""
        model = self._model
        assert model is not None
        z = model.features(packed)
        prior_mean = model.mean_module(z)
        covariance = model.covar_module(z).to_dense()
        noise = model.likelihood.noise.reshape(-1)[0]
        covariance = covariance + noise * torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=z.device)
        factor = psd_safe_cholesky(covariance)
        alpha = torch.cholesky_solve((y - prior_mean).unsqueeze(-1), factor).squeeze(-1)
        if not bool(torch.isfinite(factor).all()) or not bool(torch.isfinite(alpha).all()):
            raise NumericalFailure("non-finite posterior cache")
        return z, factor, alpha

    def _prior_answer(self, m: int) -> tuple[Tensor, Tensor]:
        mean = torch.full((m,), self._prior_mean, dtype=torch.float64)
        var = torch.full((m,), max(self._prior_var, MIN_VARIANCE), dtype=torch.float64)
        return mean, var

    def posterior(self, rows: SurrogateRows) -> tuple[Tensor, Tensor]:
        """Predict the scores of ``M`` candidate rows.

        Args:
            rows: ``M`` candidate rows.

        Returns:
            ``(mean, variance)``, each of shape ``[M]``, float64 on the CPU, in target units. The
            variance is that of the latent function (observation noise excluded), at least ``1e-12``.
            Without a usable fit both are the prior: the single target (or 0) with variance 1 after
            a fit on fewer than two rows, the training mean and variance after a failed fit.

        """
        self._validate(rows)
        m = len(rows)
        if self._mode != "model" or self._model is None or m == 0:
            return self._prior_answer(m)
        mu, std = self._y_mean, self._y_std
        try:
            with torch.no_grad(), gp_settings(self._jitter):
                self._set_eval()
                if self._cache is None:
                    assert self._train_inputs is not None and self._train_targets is not None
                    self._cache = self._compute_cache(self._train_inputs, self._train_targets)
                z, factor, alpha = self._cache
                model = self._model
                z_test = model.features(self._inputs(rows, mu, std))
                cross = model.covar_module(z, z_test).to_dense()  # [N, M]
                mean = model.mean_module(z_test) + cross.mT @ alpha
                solved = torch.linalg.solve_triangular(factor, cross, upper=False)
                var = model.covar_module(z_test, diag=True) - solved.square().sum(dim=0)
        except NUMERICAL_ERRORS as error:
            logger.warning(
                "%s: posterior failed (%s: %s); answering with the prior",
                type(self).__name__,
                type(error).__name__,
                error,
            )
            return torch.full((m,), mu, dtype=torch.float64), torch.full((m,), std**2, dtype=torch.float64)
        mean = mean.detach().to("cpu", torch.float64) * std + mu
        var = var.detach().to("cpu", torch.float64) * std**2
        bad = ~(torch.isfinite(mean) & torch.isfinite(var))
        if bool(bad.any()):
            logger.warning("%s: %d non-finite predictions replaced by the prior", type(self).__name__, int(bad.sum()))
            mean = torch.where(bad, torch.full_like(mean, mu), mean)
            var = torch.where(bad, torch.full_like(var, std**2), var)
        return mean, var.clamp_min(MIN_VARIANCE)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to answer ``posterior`` and continue fitting exactly.

        Holds only tensors (on the CPU), dicts, lists, strings, floats, ints and bools, so that
        ``torch.load(..., weights_only=True)`` reads it back.
        """
        return {
            "format": self._FORMAT,
            "config": self._config(),
            "mode": self._mode,
            "counts": dict(self._counts),
            "force_full": self._force_full,
            "jitter": float(self._jitter),
            "prior_mean": float(self._prior_mean),
            "prior_var": float(self._prior_var),
            "y_mean": float(self._y_mean),
            "y_std": float(self._y_std),
            "model": {} if self._model is None else cpu_state_dict(self._model),
            "train_inputs": None if self._train_inputs is None else self._train_inputs.detach().cpu().clone(),
            "train_targets": None if self._train_targets is None else self._train_targets.detach().cpu().clone(),
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (from this class with the same structural settings).

        Raises:
            ValueError: If ``state`` comes from another surrogate type or structural configuration.

        """
        if state.get("format") != self._FORMAT:
            raise ValueError(f"state format {state.get('format')!r} does not match {self._FORMAT!r}")
        if state.get("config") != self._config():
            raise ValueError(
                f"state was saved with config {state.get('config')} but this surrogate has {self._config()}"
            )
        self._load_extra_state(state)
        inputs, targets = state["train_inputs"], state["train_targets"]
        self._train_inputs = None if inputs is None else inputs.to(self.device, self.dtype)
        self._train_targets = None if targets is None else targets.to(self.device, self.dtype)
        if state["model"]:
            assert self._train_inputs is not None and self._train_targets is not None
            with seeded(0, self.device):  # building modules draws from the RNG; keep the caller's untouched
                model = self._build_model(self._train_inputs, self._train_targets)
            model.load_state_dict(state["model"])
            self._model = model
            self._set_eval()
        else:
            self._model = None
        self._mode = str(state["mode"])
        self._counts = {key: int(value) for key, value in state["counts"].items()}
        self._force_full = bool(state["force_full"])
        self._jitter = float(state["jitter"])
        self._prior_mean = float(state["prior_mean"])
        self._prior_var = float(state["prior_var"])
        self._y_mean = float(state["y_mean"])
        self._y_std = float(state["y_std"])
        self._cache = None


__all__ = [
    "MIN_VARIANCE",
    "NUMERICAL_ERRORS",
    "RECOVERY_JITTER",
    "ExactGPModel",
    "ExactGPSurrogateBase",
    "NumericalFailure",
]
