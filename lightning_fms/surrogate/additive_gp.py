"""The library's default surrogate: the plain GP's kernel plus separately scaled kernels on curve and weights.

The kernel on a row ``(x, budget, curve before the epoch, weights after the epoch before)`` is a sum

``k = s_hp * Matern52_ARD([x, budget]) + s_curve * Matern52_ARD([curve features, budget])
+ s_weights * Matern52_ARD([weight features, budget])``

The first term is exactly the plain GP's kernel (:class:`~lightning_fms.surrogate.plain_gp.PlainGPSurrogate`).
Each further term has its own output scale, so the marginal likelihood can switch off what does not help
(``s -> 0``) and the model falls back to the plain GP: by construction it cannot need more than the plain GP
to explain the data. Curve features are four numbers read from the observed curve (last value, best value,
last change, whether there is a curve), in the targets' standardised units; weight features are a featurizer's
output (by default the fixed statistics of :mod:`lightning_fms.weights.summary`), standardised per column on the
training rows. The featurizer is not trained here: its output is computed once per checkpoint, cached by key,
which keeps a decision as cheap as a plain-GP decision.

Cost: above ``fit_rows`` rows the hyperparameters are trained on a random subsample and only the final
posterior conditions on every row, so a decision at 2,000 observations costs a small multiple of one at 100.

Fit schedule: a fit from a fresh initialisation (``full_fit_steps`` Adam steps) on the first ``full_fits`` fits
and then every ``refit_every``-th fit; in between, fits warm-start from the last parameters and run
``refine_steps`` steps.
"""

from __future__ import annotations

import math
from typing import Any

import gpytorch
import torch
from torch import Tensor, nn

from lightning_fms.surrogate._base import SurrogateRows
from lightning_fms.surrogate.exact_gp import ExactGPModel, ExactGPSurrogateBase
from lightning_fms.surrogate.feature_extractor import WeightsBranch
from lightning_fms.surrogate.numerics import check_finite, cpu_state_dict
from lightning_fms.surrogate.target_warp import RankWarp

#: Learning-curve features per row: last value, best value, last change, has-a-curve flag.
CURVE_FEATURES = 4


def curve_features(rows: SurrogateRows, mu: float, std: float, warp: RankWarp | None = None) -> Tensor:
    """Summaries of each row's observed curve, in standardised target units.

    Args:
        rows: ``N`` rows (curves ``[N, L]`` with ``curve_lengths`` real entries each).
        mu: Mean of the targets' standardisation.
        std: Standard deviation of the targets' standardisation.
        warp: The targets' warp, applied to the curve values first (``None``: none).

    Returns:
        ``[N, 4]`` float64: ``(y_last - mu) / std``, ``(max y - mu) / std``, ``(y_last - y_before) / std`` and
        ``1`` when the row has a curve; all ``0`` for a row without one (a fresh configuration).
    """
    curves = rows.curves.to(torch.float64) if warp is None else warp.forward(rows.curves)
    lengths = rows.curve_lengths.to(torch.long).clamp(0, curves.shape[1])
    n = curves.shape[0]
    out = torch.zeros(n, CURVE_FEATURES, dtype=torch.float64)
    has = lengths > 0
    if not bool(has.any()):
        return out
    rows_with = torch.nonzero(has).squeeze(-1)
    last_index = (lengths[rows_with] - 1).clamp_min(0)
    last = curves[rows_with, last_index]
    before = torch.where(lengths[rows_with] > 1, curves[rows_with, (last_index - 1).clamp_min(0)], last)
    real = torch.arange(curves.shape[1]).unsqueeze(0) < lengths[rows_with].unsqueeze(-1)
    best = torch.where(real, curves[rows_with], torch.full_like(curves[rows_with], -math.inf)).amax(dim=1)
    out[rows_with, 0] = (last - mu) / std
    out[rows_with, 1] = (best - mu) / std
    out[rows_with, 2] = (last - before) / std
    out[rows_with, 3] = 1.0
    return out


class AdditiveGPSurrogate(ExactGPSurrogateBase):
    """Exact GP with the plain GP's ARD kernel plus separately scaled curve and weight kernels.

    Targets are standardised inside and the posterior is mapped back; ``posterior`` returns the latent
    variance. Determinism, failure recovery and the state format follow
    :class:`~lightning_fms.surrogate.exact_gp.ExactGPSurrogateBase`.

    Args:
        x_dim: Number of encoded hyperparameters ``D``.
        curve_length: Curve width ``L`` of the rows (the per-trial epoch cap).
        featurizer: Optional weights encoder (``forward(modules, keys, references) -> [B, E]``), used
            without gradients; ``None`` leaves the weight term out.
        use_curve: Whether to add the learning-curve term.
        full_fit_steps: Adam steps of a fit from a fresh initialisation.
        refine_steps: Adam steps of a warm-started fit.
        full_fits: Number of initial fits that start fresh.
        refit_every: After those, every ``refit_every``-th fit starts fresh too (``0``: never).
        learning_rate: Adam learning rate of a fresh fit (warm-started fits use half of it).
        initial_noise: Observation-noise variance (standardised units) of a fresh model.
        extra_scale: Initial output scale of the curve and weight terms (the plain-GP term starts at 1).
        fit_rows: Above this many rows the kernel's hyperparameters are trained on a seeded random subsample
            of this size, and the posterior then conditions on every row (one Cholesky factor): the cost of a
            fit stays nearly flat in the number of rows. ``None``: always train on every row.
        warp_targets: Fit the GP to the targets' normal scores (:class:`~lightning_fms.surrogate.target_warp.RankWarp`)
            and map predictions back, so that diverged runs do not dominate the fit.
        device: Where to fit; ``None`` picks CUDA when available, else the CPU.
        dtype: Floating type of the GP.
    """

    _FORMAT = "additive_gp/1"

    def __init__(
        self,
        *,
        x_dim: int,
        curve_length: int,
        featurizer: nn.Module | None = None,
        use_curve: bool = True,
        full_fit_steps: int = 100,
        refine_steps: int = 25,
        full_fits: int = 3,
        refit_every: int = 5,
        learning_rate: float = 0.1,
        initial_noise: float = 0.1,
        extra_scale: float = 0.1,
        fit_rows: int | None = 300,
        warp_targets: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(x_dim=x_dim, curve_length=curve_length, device=device, dtype=dtype)
        if min(full_fit_steps, refine_steps) < 0 or full_fits < 1 or refit_every < 0:
            raise ValueError("fit steps must be >= 0, full_fits >= 1 and refit_every >= 0")
        if not initial_noise > 1e-4:
            raise ValueError(f"initial_noise must be > 1e-4 (the likelihood's lower bound), got {initial_noise}")
        if not extra_scale > 0:
            raise ValueError(f"extra_scale must be positive, got {extra_scale}")
        self.featurizer = featurizer
        self.use_curve = bool(use_curve)
        self.full_fit_steps = int(full_fit_steps)
        self.refine_steps = int(refine_steps)
        self.full_fits = int(full_fits)
        self.refit_every = int(refit_every)
        self.learning_rate = float(learning_rate)
        self.initial_noise = float(initial_noise)
        self.extra_scale = float(extra_scale)
        if fit_rows is not None and int(fit_rows) < 2:
            raise ValueError(f"fit_rows must be at least 2 (or None), got {fit_rows!r}")
        self.fit_rows = None if fit_rows is None else int(fit_rows)
        self.warp_targets = bool(warp_targets)
        self._warp = RankWarp()
        self._weights = None if featurizer is None else WeightsBranch(featurizer, self.device)
        self.embedding_dim = 0 if self._weights is None else self._weights.embedding_dim
        self._w_mean: Tensor | None = None
        self._w_std: Tensor | None = None

    # ------------------------------------------------------------------ layout of packed inputs

    @property
    def _hp_dims(self) -> list[int]:
        return list(range(self.x_dim + 1))  # x, budget

    @property
    def _curve_dims(self) -> list[int]:
        start = self.x_dim + 1
        return [*range(start, start + CURVE_FEATURES), self.x_dim] if self.use_curve else []

    @property
    def _weight_dims(self) -> list[int]:
        start = self.x_dim + 1 + (CURVE_FEATURES if self.use_curve else 0)
        return [*range(start, start + self.embedding_dim), self.x_dim] if self.embedding_dim else []

    # ------------------------------------------------------------------ hooks

    def packed_width(self) -> int:
        """Width of the packed inputs: ``D + 1`` (+ 4 curve features) (+ ``E`` weight features)."""
        return self.x_dim + 1 + (CURVE_FEATURES if self.use_curve else 0) + self.embedding_dim

    def x_column_parameters(self) -> dict[str, int]:
        """The plain-GP term's ARD lengthscales ``[1, D + 1]`` (the last one is the budget's)."""
        additive = bool(self._curve_dims or self._weight_dims)
        prefix = "covar_module.base_kernel.kernels.0." if additive else "covar_module.base_kernel."
        return {f"{prefix}raw_lengthscale": 1}

    def _config(self) -> dict[str, Any]:
        return {
            "x_dim": self.x_dim,
            "curve_length": self.curve_length,
            "use_curve": self.use_curve,
            "embedding_dim": self.embedding_dim,
            "warp_targets": self.warp_targets,
            "dtype": str(self.dtype),
        }

    def _wants_full_fit(self) -> bool:
        fits = self._counts["fits"]
        if self._model is None or self._force_full or fits < self.full_fits:
            return True
        return self.refit_every > 0 and (fits - self.full_fits) % self.refit_every == self.refit_every - 1

    def _validate(self, rows: SurrogateRows) -> None:
        super()._validate(rows)
        if self.use_curve:
            check_finite("rows.curves", rows.curves)
        if self.featurizer is not None and rows.weights is None:
            raise ValueError("a surrogate with a featurizer needs rows with weights and weight_index")

    def _term(self, dims: list[int], scale: float) -> gpytorch.kernels.Kernel:
        base = gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=len(dims), active_dims=torch.tensor(dims))
        base.lengthscale = math.sqrt(len(dims)) * 0.7
        kernel = gpytorch.kernels.ScaleKernel(base)
        kernel.outputscale = scale
        return kernel

    def _build_model(self, train_inputs: Tensor, train_targets: Tensor) -> ExactGPModel:
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        likelihood.noise = self.initial_noise
        dims = self._hp_dims
        hp = gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=len(dims), active_dims=torch.tensor(dims))
        terms: list[gpytorch.kernels.Kernel] = [hp]
        for dims in (self._curve_dims, self._weight_dims):
            if dims:
                terms.append(self._term(dims, self.extra_scale))
        base: gpytorch.kernels.Kernel = terms[0] if len(terms) == 1 else gpytorch.kernels.AdditiveKernel(*terms)
        return ExactGPModel(train_inputs, train_targets, likelihood, base).to(self.device, self.dtype)

    def _extra_state(self) -> dict[str, Any]:
        return {
            "w_mean": None if self._w_mean is None else self._w_mean.cpu().clone(),
            "w_std": None if self._w_std is None else self._w_std.cpu().clone(),
            "featurizer": {} if self.featurizer is None else cpu_state_dict(self.featurizer),
            "warp": self._warp.state_dict(),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._w_mean = state.get("w_mean")
        self._w_std = state.get("w_std")
        self._warp = RankWarp()
        self._warp.load_state_dict(state.get("warp", {}))
        if self.featurizer is not None and state.get("featurizer"):
            self.featurizer.load_state_dict(state["featurizer"])

    # ------------------------------------------------------------------ inputs

    def _raw_weight_features(self, rows: SurrogateRows) -> Tensor:
        """The featurizer's output for each row, ``[N, E]`` float64 on the CPU (no gradients)."""
        assert self._weights is not None
        self._weights.featurizer.eval()
        with torch.no_grad():
            return self._weights.embed(rows, torch.device("cpu"), torch.float64)

    def _pack(self, rows: SurrogateRows, mu: float, std: float, weights: Tensor | None) -> Tensor:
        parts = [rows.x.to(torch.float64), rows.budget.to(torch.float64).unsqueeze(-1)]
        if self.use_curve:
            parts.append(curve_features(rows, mu, std, self._warp))
        if weights is not None:
            assert self._w_mean is not None and self._w_std is not None
            parts.append((weights - self._w_mean) / self._w_std)
        return torch.cat(parts, dim=-1).to(self.device, self.dtype)

    def _inputs(self, rows: SurrogateRows, mu: float, std: float) -> Tensor:
        weights = self._raw_weight_features(rows) if self.featurizer is not None else None
        return self._pack(rows, mu, std, weights)

    def pack_features(self, rows: SurrogateRows, mu: float, std: float, weight_features: Tensor | None) -> Tensor:
        """Packed inputs ``[N, P]`` of rows whose weight features are given, standardised on these rows as a fit does.

        What meta-training over earlier tasks feeds the model (their weight features are computed once, beforehand).

        Args:
            rows: ``N`` rows (their ``weights`` are not read).
            mu: Mean of the targets' standardisation.
            std: Standard deviation of the targets' standardisation.
            weight_features: ``[N, E]`` raw featurizer output per row, or ``None`` for a surrogate without weights.

        Raises:
            ValueError: features given to a surrogate without a weight term, or of the wrong width.
        """
        if (weight_features is None) != (self.embedding_dim == 0):
            raise ValueError("weight features must be given exactly when the surrogate has a weight term")
        if weight_features is None:
            return self._pack(rows, mu, std, None)
        if weight_features.shape != (len(rows), self.embedding_dim):
            raise ValueError(
                f"weight_features must be [{len(rows)}, {self.embedding_dim}], got {tuple(weight_features.shape)}"
            )
        features = weight_features.to(torch.float64)
        self._w_mean = features.mean(dim=0)
        spread = features.std(dim=0) if len(rows) > 1 else torch.ones_like(self._w_mean)
        self._w_std = torch.where(torch.isfinite(spread) & (spread > 1e-12), spread, torch.ones_like(spread))
        return self._pack(rows, mu, std, features)

    # ------------------------------------------------------------------ fit and posterior in warped units

    def fit(self, rows: SurrogateRows, targets: Tensor, seed: int) -> None:
        """Condition on ``rows`` (see :meth:`ExactGPSurrogateBase.fit`), in warped target units."""
        previous = self._warp
        if targets.shape == (len(rows),) and bool(torch.isfinite(targets).all()):
            self._warp = RankWarp().fit(targets) if self.warp_targets and len(rows) >= 2 else RankWarp()
        try:
            super().fit(rows, self._warp.forward(targets) if targets.shape == (len(rows),) else targets, seed)
        except BaseException:
            self._warp = previous
            raise
        if self._mode == "prior" and len(rows) >= 2:  # a failed fit answers with the raw targets' mean and variance
            values = targets.detach().to(torch.float64)
            self._warp = RankWarp()
            self._prior_mean, self._prior_var = float(values.mean()), float(values.var())

    def posterior(self, rows: SurrogateRows) -> tuple[Tensor, Tensor]:
        """Predict ``(mean, variance)`` (each ``[M]``, float64, target units), mapped back from the warp."""
        mean, variance = super().posterior(rows)
        return self._warp.inverse(mean, variance)

    # ------------------------------------------------------------------ training

    def _train(self, rows: SurrogateRows, targets: Tensor, mu: float, std: float, full: bool) -> Tensor:
        weights = None
        if self.featurizer is not None:
            weights = self._raw_weight_features(rows)
            self._w_mean = weights.mean(dim=0)
            spread = weights.std(dim=0) if len(rows) > 1 else torch.ones_like(self._w_mean)
            self._w_std = torch.where(torch.isfinite(spread) & (spread > 1e-12), spread, torch.ones_like(spread))
        inputs = self._pack(rows, mu, std, weights)
        fit_inputs, fit_targets = inputs, targets
        if self.fit_rows is not None and len(rows) > self.fit_rows:  # seeded by the fit's generator
            subset = torch.randperm(len(rows))[: self.fit_rows].sort().values.to(inputs.device)
            fit_inputs, fit_targets = inputs[subset], targets[subset]
        if full or self._model is None:
            self._model = self._fresh_model(fit_inputs, fit_targets)
            steps, lr = self._fresh_fit_steps(self.full_fit_steps), self.learning_rate
        else:
            self._model.set_train_data(inputs=fit_inputs, targets=fit_targets, strict=False)
            steps, lr = self.refine_steps, self.learning_rate * 0.5
        self._maximise_likelihood(lambda: fit_inputs, fit_targets, steps, lr)
        self._model.set_train_data(inputs=inputs, targets=targets, strict=False)
        return inputs


__all__ = ["CURVE_FEATURES", "AdditiveGPSurrogate", "curve_features"]
