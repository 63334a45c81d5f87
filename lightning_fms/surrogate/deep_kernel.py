"""DyHPO's deep-kernel Gaussian process, with FMS's optional checkpoint-weights branch.

The surrogate maps a row ``(x, budget, curve before the epoch, weights)`` through a small neural
feature extractor into a 128-d space and puts an exact GP with an RBF (or Matern-5/2) kernel on top.
Extractor, featurizer and GP hyperparameters are trained together by maximising the exact marginal
log-likelihood with Adam (full batch), as in DyHPO (Wistuba et al., 2022) and FMS:

* the first ``full_fits`` fits start from a fresh initialisation and run ``full_fit_steps`` steps;
* later fits warm-start from the current parameters and run ``refine_steps`` steps;
* on a numerical failure the fit reverts to the parameters from before the fit, retries once as a
  full fit with a larger Cholesky jitter and, if that fails too, answers with the prior.

This module also holds the machinery shared with :mod:`lightning_fms.surrogate.plain_gp`
(:class:`ExactGPSurrogateBase`): target standardisation, seeded fits, failure recovery, the
query-independent exact posterior and the state-dict format.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import gpytorch
import torch
from linear_operator.utils.cholesky import psd_safe_cholesky
from linear_operator.utils.errors import NanError, NotPSDError
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor, nn

from lightning_fms.surrogate._base import Surrogate, SurrogateRows

logger = logging.getLogger(__name__)

#: Cholesky jitter (in standardised target units) of the one retry after a numerical failure.
RECOVERY_JITTER = 1e-4
#: Exact Cholesky algebra up to this many rows (GPyTorch would switch to CG/Lanczos at 800).
MAX_CHOLESKY_SIZE = 100_000
#: Smallest variance ``posterior`` returns.
MIN_VARIANCE = 1e-12


class NumericalFailure(RuntimeError):
    """A non-finite loss, parameter or posterior cache met during a fit."""


#: Everything a fit step may raise that triggers recovery instead of propagating.
NUMERICAL_ERRORS: tuple[type[BaseException], ...] = (NotPSDError, NanError, torch.linalg.LinAlgError, NumericalFailure)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return ``device`` as a ``torch.device``; ``None`` means CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's CPU (and ``device``'s CUDA) generator inside a fork, leaving the caller's RNG untouched."""
    cuda = device.type == "cuda"
    index = device.index if device.index is not None else (torch.cuda.current_device() if cuda else 0)
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(int(seed))
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(int(seed))
        yield


@contextmanager
def gp_settings(jitter: float) -> Iterator[None]:
    """GPyTorch settings of every fit and prediction: exact Cholesky algebra, optional larger jitter.

    Args:
        jitter: Cholesky jitter for both float and double; ``0`` keeps GPyTorch's defaults.

    """
    with ExitStack() as stack:
        stack.enter_context(gpytorch.settings.max_cholesky_size(MAX_CHOLESKY_SIZE))
        if jitter > 0:
            stack.enter_context(gpytorch.settings.cholesky_jitter(float_value=jitter, double_value=jitter))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", NumericalWarning)
        yield


def standardiser(targets: Tensor) -> tuple[float, float]:
    """Mean and standard deviation used to standardise ``targets`` (shape ``[N]``, ``N >= 2``).

    The standard deviation falls back to 1 when it is (relatively) zero or not finite.
    """
    values = targets.detach().to(torch.float64)
    mu = float(values.mean())
    std = float(values.std()) if values.numel() > 1 else 1.0
    if not math.isfinite(std) or std <= 1e-8 * max(1.0, abs(mu)):
        std = 1.0
    return mu, std


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """Return a detached CPU copy of ``module.state_dict()`` as a plain dict."""
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}


def _check_finite(name: str, value: Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


class ExactGPSurrogateBase(Surrogate):
    """Shared fit/posterior/state machinery of the exact-GP surrogates (not a public surrogate itself).

    Subclasses provide the model (an ``ExactGP`` with ``mean_module``, ``covar_module`` and a
    ``GaussianLikelihood``), the input packing, the feature map applied before the kernel and the
    training loop. The posterior is computed here from the model's modules with an explicit
    Cholesky factor of the training covariance so that its value depends only on the fitted state
    and the queried rows (GPyTorch's joint train/test kernel evaluation centres the distance
    computation on the *joint* inputs, which makes the last bits depend on the query batch).

    Posterior variances are those of the latent function ``f`` (no observation noise): the
    acquisition asks how good the *true* score could be, not how noisy one measurement is.
    """

    _FORMAT = "exact_gp/1"

    def __init__(self, *, device: str | torch.device | None, dtype: torch.dtype) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.device = resolve_device(device)
        self.dtype = dtype
        self._model: gpytorch.models.ExactGP | None = None
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

    # ------------------------------------------------------------------ subclass hooks

    def _config(self) -> dict[str, Any]:
        """Structural settings that a loaded state must match."""
        raise NotImplementedError

    def _build_model(self, train_inputs: Tensor, train_targets: Tensor) -> gpytorch.models.ExactGP:
        """Build a freshly initialised model on ``self.device`` in ``self.dtype`` (draws from the global RNG)."""
        raise NotImplementedError

    def _inputs(self, rows: SurrogateRows, mu: float, std: float) -> Tensor:
        """Packed model inputs ``[N, P]`` of ``rows`` for prediction (eval mode, no gradients)."""
        raise NotImplementedError

    def _train(self, rows: SurrogateRows, targets: Tensor, mu: float, std: float, full: bool) -> Tensor:
        """Train ``self._model`` (building it first when ``full``) and return the final packed inputs ``[N, P]``."""
        raise NotImplementedError

    def _features(self, packed: Tensor) -> Tensor:
        """Map packed inputs ``[N, P]`` to the kernel's input (identity unless overridden)."""
        return packed

    def _wants_full_fit(self) -> bool:
        return True

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    def _set_eval(self) -> None:
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

    def _check_rows(self, rows: SurrogateRows, x_dim: int) -> None:
        if rows.x.shape[1] != x_dim:
            raise ValueError(f"rows.x must have {x_dim} columns, got {rows.x.shape[1]}")
        _check_finite("rows.x", rows.x)
        _check_finite("rows.budget", rows.budget)

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
        _check_finite("targets", targets)
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

    def _validate(self, rows: SurrogateRows) -> None:
        raise NotImplementedError

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
        z = self._features(packed)
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
                z_test = self._features(self._inputs(rows, mu, std))
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
            "model": {} if self._model is None else _cpu_state(self._model),
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


class _FeatureExtractor(nn.Module):
    """DyHPO's extractor: ``[x, budget]`` MLP, curve CNN, optional weight embedding, fused to ``output_dim``.

    Input is the packed row ``[x (D), budget (1), curve (W, if used), embedding (E, if any)]``.
    """

    def __init__(
        self,
        *,
        x_dim: int,
        curve_width: int,
        use_curve: bool,
        embedding_dim: int,
        hidden: int,
        output_dim: int,
        cnn_channels: int,
        cnn_kernel: int,
    ) -> None:
        super().__init__()
        self.hp_end = x_dim + 1
        self.curve_end = self.hp_end + (curve_width if use_curve else 0)
        self.embedding_dim = embedding_dim
        self.hp = nn.Sequential(nn.Linear(x_dim + 1, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU())
        self.curve = nn.Conv1d(1, cnn_channels, cnn_kernel) if use_curve else None
        fused = hidden + (cnn_channels if use_curve else 0) + embedding_dim
        self.out = nn.Sequential(nn.Linear(fused, output_dim), nn.LeakyReLU())

    def forward(self, packed: Tensor) -> Tensor:
        """Map packed rows ``[N, P]`` to GP features ``[N, output_dim]``."""
        parts = [self.hp(packed[:, : self.hp_end])]
        if self.curve is not None:
            curve = packed[:, self.hp_end : self.curve_end].unsqueeze(1)  # [N, 1, W]
            parts.append(self.curve(curve).amax(dim=-1))  # global max pool -> [N, C]
        if self.embedding_dim:
            parts.append(packed[:, self.curve_end :])
        return self.out(torch.cat(parts, dim=-1))


class _DeepKernelGP(gpytorch.models.ExactGP):
    """Exact GP whose ``forward`` runs the feature extractor before ``ConstantMean`` and the kernel."""

    def __init__(
        self,
        train_inputs: Tensor,
        train_targets: Tensor,
        likelihood: gpytorch.likelihoods.GaussianLikelihood,
        extractor: _FeatureExtractor,
        kernel: str,
    ) -> None:
        super().__init__(train_inputs, train_targets, likelihood)
        self.extractor = extractor
        self.mean_module = gpytorch.means.ConstantMean()
        base = gpytorch.kernels.RBFKernel() if kernel == "rbf" else gpytorch.kernels.MaternKernel(nu=2.5)
        self.covar_module = gpytorch.kernels.ScaleKernel(base)

    def forward(self, packed: Tensor) -> gpytorch.distributions.MultivariateNormal:
        """Prior over packed rows ``[N, P]``."""
        features = self.extractor(packed)
        return gpytorch.distributions.MultivariateNormal(self.mean_module(features), self.covar_module(features))


class DeepKernelSurrogate(ExactGPSurrogateBase):
    """DyHPO's deep-kernel GP; with a ``featurizer`` it also reads checkpoint weights (FMS).

    Rows are normalised inside: targets are standardised with the training mean and standard
    deviation, the real entries of each curve go through the same affine map (padding stays 0),
    and the posterior is mapped back (``mean * std + mu``, ``var * std**2``). ``posterior`` returns
    the variance of the latent function, without observation noise.

    After ``load_state_dict`` the surrogate answers ``posterior`` at once, also with a featurizer:
    the training rows' embeddings are stored as tensors (computed in eval mode at the end of the
    fit), and candidate rows bring their own ``weights``. Only the next ``fit`` needs the training
    rows' modules again, which the caller passes anyway.

    Args:
        x_dim: Number of encoded hyperparameters ``D``.
        curve_length: Curve width ``L`` of the rows (the per-trial epoch cap); curves are zero-padded
            to at least ``cnn_kernel``.
        featurizer: Optional weights encoder: a module with an ``embedding_dim: int`` attribute whose
            ``forward(modules: Sequence[nn.Module], keys: Sequence | None = None)`` returns a
            differentiable ``[len(modules), embedding_dim]`` tensor. It is moved to ``device``,
            trained jointly with the GP, and reset to its state at construction for every full fit.
            ``None`` gives exactly DyHPO.
        use_curve: Whether to feed the learning curve through the CNN branch (``False``: the
            "(no CNN)" ablation; curves are then ignored).
        kernel: ``"rbf"`` (DyHPO, FMS) or ``"matern"`` (Matern 5/2).
        hidden: Units of the ``[x, budget]`` layer.
        output_dim: Dimension of the GP's input features.
        cnn_channels: Output channels of the curve convolution.
        cnn_kernel: Kernel size of the curve convolution.
        learning_rate: Adam learning rate.
        full_fit_steps: Adam steps of a fit from scratch.
        refine_steps: Adam steps of a warm-started fit.
        full_fits: Number of initial fits that start from scratch; later fits warm-start.
        device: Where to fit; ``None`` picks CUDA when available, else the CPU.
        dtype: Floating type of the GP and the extractor (float64 by default: as fast as float32 at
            these sizes on the CPU, and more stable).
        initial_noise: Observation-noise variance (in standardised target units) a fresh model starts
            from; ``None`` keeps GPyTorch's default (about 0.69), as DyHPO and FMS do. With Adam at
            ``1e-3`` the noise moves slowly, so a small value (e.g. ``1e-2``) fits smooth curves much
            more closely within 1000 steps.

    """

    _FORMAT = "deep_kernel/1"

    def __init__(
        self,
        *,
        x_dim: int,
        curve_length: int,
        featurizer: nn.Module | None = None,
        use_curve: bool = True,
        kernel: str = "rbf",
        hidden: int = 64,
        output_dim: int = 128,
        cnn_channels: int = 4,
        cnn_kernel: int = 3,
        learning_rate: float = 1e-3,
        full_fit_steps: int = 1000,
        refine_steps: int = 50,
        full_fits: int = 10,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
        initial_noise: float | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype)
        if initial_noise is not None and not initial_noise > 1e-4:
            raise ValueError(f"initial_noise must be > 1e-4 (the likelihood's lower bound), got {initial_noise}")
        if kernel not in ("rbf", "matern"):
            raise ValueError(f"kernel must be 'rbf' or 'matern', got {kernel!r}")
        if x_dim < 0 or curve_length < 0 or cnn_kernel < 1 or min(hidden, output_dim, cnn_channels) < 1:
            raise ValueError("x_dim, curve_length must be >= 0; hidden, output_dim, cnn_channels, cnn_kernel >= 1")
        self.x_dim = int(x_dim)
        self.curve_length = int(curve_length)
        self.use_curve = bool(use_curve)
        self.kernel = kernel
        self.hidden = int(hidden)
        self.output_dim = int(output_dim)
        self.cnn_channels = int(cnn_channels)
        self.cnn_kernel = int(cnn_kernel)
        self.learning_rate = float(learning_rate)
        self.full_fit_steps = int(full_fit_steps)
        self.refine_steps = int(refine_steps)
        self.full_fits = int(full_fits)
        self.initial_noise = None if initial_noise is None else float(initial_noise)
        self.curve_width = max(self.curve_length, self.cnn_kernel)
        self.featurizer = featurizer
        self.embedding_dim = 0
        self._featurizer_init: dict[str, Tensor] = {}
        if featurizer is not None:
            embedding_dim = getattr(featurizer, "embedding_dim", None)
            if not isinstance(embedding_dim, int) or embedding_dim < 1:
                raise ValueError("featurizer must have an integer attribute embedding_dim >= 1")
            self.embedding_dim = embedding_dim
            featurizer.to(self.device)
            self._featurizer_init = _cpu_state(featurizer)

    # ------------------------------------------------------------------ hooks

    def _config(self) -> dict[str, Any]:
        return {
            "x_dim": self.x_dim,
            "curve_length": self.curve_length,
            "use_curve": self.use_curve,
            "kernel": self.kernel,
            "hidden": self.hidden,
            "output_dim": self.output_dim,
            "cnn_channels": self.cnn_channels,
            "cnn_kernel": self.cnn_kernel,
            "embedding_dim": self.embedding_dim,
            "dtype": str(self.dtype),
        }

    def _wants_full_fit(self) -> bool:
        return self._model is None or self._force_full or self._counts["fits"] < self.full_fits

    def _validate(self, rows: SurrogateRows) -> None:
        self._check_rows(rows, self.x_dim)
        if self.use_curve:
            width = rows.curves.shape[1]
            if width > self.curve_width and len(rows) and int(rows.curve_lengths.max()) > self.curve_width:
                raise ValueError(f"curves longer than curve_length={self.curve_length} cannot be used")
            _check_finite("rows.curves", rows.curves)
        if self.featurizer is not None and rows.weights is None:
            raise ValueError("a surrogate with a featurizer needs rows with weights and weight_index")

    def _build_model(self, train_inputs: Tensor, train_targets: Tensor) -> gpytorch.models.ExactGP:
        extractor = _FeatureExtractor(
            x_dim=self.x_dim,
            curve_width=self.curve_width,
            use_curve=self.use_curve,
            embedding_dim=self.embedding_dim,
            hidden=self.hidden,
            output_dim=self.output_dim,
            cnn_channels=self.cnn_channels,
            cnn_kernel=self.cnn_kernel,
        )
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        if self.initial_noise is not None:
            likelihood.noise = self.initial_noise
        model = _DeepKernelGP(train_inputs, train_targets, likelihood, extractor, self.kernel)
        return model.to(self.device, self.dtype)

    def _extra_state(self) -> dict[str, Any]:
        if self.featurizer is None:
            return {"featurizer": {}, "featurizer_init": {}}
        return {"featurizer": _cpu_state(self.featurizer), "featurizer_init": dict(self._featurizer_init)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if self.featurizer is not None:
            self._featurizer_init = {key: value.clone() for key, value in state["featurizer_init"].items()}
            self.featurizer.load_state_dict(state["featurizer"])

    def _set_eval(self) -> None:
        super()._set_eval()
        if self.featurizer is not None:
            self.featurizer.eval()

    def _features(self, packed: Tensor) -> Tensor:
        assert self._model is not None
        return self._model.extractor(packed)

    # ------------------------------------------------------------------ inputs

    def _base_inputs(self, rows: SurrogateRows, mu: float, std: float) -> Tensor:
        """``[x, budget, standardised curve]`` as ``[N, D + 1 (+ W)]`` (no embedding)."""
        device, dtype = self.device, self.dtype
        parts = [rows.x.to(device, dtype), rows.budget.to(device, dtype).unsqueeze(-1)]
        if self.use_curve:
            curves = rows.curves.to(device, torch.float64)
            n, width = curves.shape
            if width < self.curve_width:
                curves = torch.cat([curves, curves.new_zeros(n, self.curve_width - width)], dim=-1)
            curves = curves[:, : self.curve_width]
            lengths = rows.curve_lengths.to(device).clamp(0, self.curve_width)
            real = torch.arange(self.curve_width, device=device).unsqueeze(0) < lengths.unsqueeze(-1)
            curves = torch.where(real, (curves - mu) / std, torch.zeros_like(curves))
            parts.append(curves.to(dtype))
        return torch.cat(parts, dim=-1)

    def _embed(self, rows: SurrogateRows) -> Tensor:
        """Featurizer embeddings of the rows' weights, ``[N, E]`` (differentiable unless under ``no_grad``)."""
        assert self.featurizer is not None and rows.weights is not None and rows.weight_index is not None
        keys = None if rows.weight_keys is None else list(rows.weight_keys)
        table = self.featurizer(list(rows.weights), keys)
        if table.shape != (len(rows.weights), self.embedding_dim):
            raise ValueError(
                f"featurizer returned shape {tuple(table.shape)}, expected [{len(rows.weights)}, {self.embedding_dim}]"
            )
        return table.to(self.device, self.dtype)[rows.weight_index.to(self.device)]

    def _pack(self, base: Tensor, rows: SurrogateRows) -> Tensor:
        if self.featurizer is None:
            return base
        return torch.cat([base, self._embed(rows)], dim=-1)

    def _inputs(self, rows: SurrogateRows, mu: float, std: float) -> Tensor:
        return self._pack(self._base_inputs(rows, mu, std), rows)

    # ------------------------------------------------------------------ training

    def _loss(self, rows: SurrogateRows, base: Tensor, targets: Tensor) -> Tensor:
        """Negative exact marginal log-likelihood (per row) of one full-batch training step."""
        model = self._model
        assert model is not None
        packed = self._pack(base, rows)
        if self.featurizer is not None:  # the embedding changes every step: refresh the training inputs
            model.set_train_data(inputs=packed, targets=targets, strict=False)
        return -self._mll(model(packed), targets)

    def _record_new_featurizer_parts(self) -> None:
        """Remember the initial values of featurizer parts built after construction.

        NFN and FLAT build per-architecture parts when they first meet an architecture; full fits
        restart the featurizer from these recorded values.
        """
        assert self.featurizer is not None
        for key, value in _cpu_state(self.featurizer).items():
            self._featurizer_init.setdefault(key, value)

    def _train(self, rows: SurrogateRows, targets: Tensor, mu: float, std: float, full: bool) -> Tensor:
        base = self._base_inputs(rows, mu, std)
        if full:
            if self.featurizer is not None:
                self._record_new_featurizer_parts()
                self.featurizer.load_state_dict(self._featurizer_init)
                self.featurizer.eval()
                with torch.no_grad():
                    packed = self._pack(base, rows)
            else:
                packed = base
            self._model = self._build_model(packed, targets)
        model = self._model
        assert model is not None
        if self.featurizer is None:
            model.set_train_data(inputs=base, targets=targets, strict=False)
        model.train()
        parameters = list(model.parameters())
        if self.featurizer is not None:
            self.featurizer.train()
            parameters += list(self.featurizer.parameters())
        steps = self.full_fit_steps if full else self.refine_steps
        self._mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        self._optimise(parameters, lambda: self._loss(rows, base, targets), steps, self.learning_rate)
        self._set_eval()
        with torch.no_grad():
            packed = self._pack(base, rows).detach()
        model.set_train_data(inputs=packed, targets=targets, strict=False)
        return packed


__all__ = ["DeepKernelSurrogate", "ExactGPSurrogateBase", "NumericalFailure", "RECOVERY_JITTER"]
