"""DyHPO's deep-kernel Gaussian process, with FMS's optional checkpoint-weights branch.

The surrogate maps a row ``(x, budget, curve before the epoch, weights)`` through a small neural
feature extractor (:mod:`lightning_fms.surrogate.feature_extractor`) into a 128-d space and puts an
exact GP with an RBF (or Matern-5/2) kernel on top. Extractor, featurizer and GP hyperparameters are
trained together by maximising the exact marginal log-likelihood with Adam (full batch), as in DyHPO
(Wistuba et al., 2022) and FMS:

* the first ``full_fits`` fits start from a fresh initialisation and run ``full_fit_steps`` steps;
* later fits warm-start from the current parameters and run ``refine_steps`` steps;
* on a numerical failure the fit reverts to the parameters from before the fit, retries once as a
  full fit with a larger Cholesky jitter and, if that fails too, answers with the prior (see
  :class:`~lightning_fms.surrogate.exact_gp.ExactGPSurrogateBase`).
"""

from __future__ import annotations

import functools
from typing import Any

import gpytorch
import torch
from torch import Tensor, nn

from lightning_fms.surrogate._base import SurrogateRows
from lightning_fms.surrogate.exact_gp import ExactGPModel, ExactGPSurrogateBase
from lightning_fms.surrogate.feature_extractor import FeatureExtractor, WeightsBranch, pack_rows
from lightning_fms.surrogate.numerics import check_finite


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
        super().__init__(x_dim=x_dim, curve_length=curve_length, device=device, dtype=dtype)
        if initial_noise is not None and not initial_noise > 1e-4:
            raise ValueError(f"initial_noise must be > 1e-4 (the likelihood's lower bound), got {initial_noise}")
        if kernel not in ("rbf", "matern"):
            raise ValueError(f"kernel must be 'rbf' or 'matern', got {kernel!r}")
        if cnn_kernel < 1 or min(hidden, output_dim, cnn_channels) < 1:
            raise ValueError("hidden, output_dim, cnn_channels and cnn_kernel must be >= 1")
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
        self._weights = None if featurizer is None else WeightsBranch(featurizer, self.device)
        self.embedding_dim = 0 if self._weights is None else self._weights.embedding_dim

    # ------------------------------------------------------------------ hooks

    def packed_width(self) -> int:
        """Width of the packed inputs: ``D + 1`` (+ the curve's ``W``) (+ ``E`` embedding)."""
        return self.x_dim + 1 + (self.curve_width if self.use_curve else 0) + self.embedding_dim

    def x_column_parameters(self) -> dict[str, int]:
        """The first layer of the ``[x, budget]`` MLP, ``[hidden, D + 1]`` (its last input column is the budget)."""
        return {"extractor.hp.0.weight": 1}

    def pack_features(
        self, rows: SurrogateRows, mu: float, std: float, weight_features: Tensor | None = None
    ) -> Tensor:
        """Packed inputs ``[N, P]`` of rows for a surrogate without a featurizer (meta-training reads these).

        Raises:
            ValueError: weight features given (the deep kernel trains its featurizer with the GP instead).
        """
        if weight_features is not None or self._weights is not None:
            raise ValueError("pack_features is for a deep-kernel surrogate without a featurizer")
        return self._base_inputs(rows, mu, std)

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
        super()._validate(rows)
        if self.use_curve:
            width = rows.curves.shape[1]
            if width > self.curve_width and len(rows) and int(rows.curve_lengths.max()) > self.curve_width:
                raise ValueError(f"curves longer than curve_length={self.curve_length} cannot be used")
            check_finite("rows.curves", rows.curves)
        if self._weights is not None and rows.weights is None:
            raise ValueError("a surrogate with a featurizer needs rows with weights and weight_index")

    def _build_model(self, train_inputs: Tensor, train_targets: Tensor) -> ExactGPModel:
        extractor = FeatureExtractor(
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
        base_kernel = gpytorch.kernels.RBFKernel() if self.kernel == "rbf" else gpytorch.kernels.MaternKernel(nu=2.5)
        model = ExactGPModel(train_inputs, train_targets, likelihood, base_kernel, extractor)
        return model.to(self.device, self.dtype)

    def _extra_state(self) -> dict[str, Any]:
        if self._weights is None:
            return {"featurizer": {}, "featurizer_init": {}}
        return self._weights.state_dict()

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if self._weights is not None:
            self._weights.load_state_dict(state)

    def _set_eval(self) -> None:
        super()._set_eval()
        if self.featurizer is not None:
            self.featurizer.eval()

    # ------------------------------------------------------------------ inputs

    def _base_inputs(self, rows: SurrogateRows, mu: float, std: float) -> Tensor:
        """``[x, budget, standardised curve]`` as ``[N, D + 1 (+ W)]`` (no embedding)."""
        return pack_rows(
            rows,
            use_curve=self.use_curve,
            curve_width=self.curve_width,
            mu=mu,
            std=std,
            device=self.device,
            dtype=self.dtype,
        )

    def _pack(self, base: Tensor, rows: SurrogateRows) -> Tensor:
        """Append the weights embedding (with a featurizer) to base inputs: ``[N, D + 1 (+ W) (+ E)]``."""
        if self._weights is None:
            return base
        return torch.cat([base, self._weights.embed(rows, self.device, self.dtype)], dim=-1)

    def _inputs(self, rows: SurrogateRows, mu: float, std: float) -> Tensor:
        return self._pack(self._base_inputs(rows, mu, std), rows)

    # ------------------------------------------------------------------ training

    def _train(self, rows: SurrogateRows, targets: Tensor, mu: float, std: float, full: bool) -> Tensor:
        base = self._base_inputs(rows, mu, std)
        if full:
            if self._weights is not None:
                self._weights.restart()
                with torch.no_grad():
                    packed = self._pack(base, rows)
            else:
                packed = base
            self._model = self._fresh_model(packed, targets)
        model = self._model
        assert model is not None
        extra: list[nn.Parameter] = []
        if self._weights is None:
            model.set_train_data(inputs=base, targets=targets, strict=False)
        else:
            self._weights.featurizer.train()
            extra = list(self._weights.featurizer.parameters())
        steps = self._fresh_fit_steps(self.full_fit_steps) if full else self.refine_steps
        inputs = functools.partial(self._step_inputs, base, rows, targets)
        self._maximise_likelihood(inputs, targets, steps, self.learning_rate, extra)
        self._set_eval()
        with torch.no_grad():
            packed = self._pack(base, rows).detach()
        model.set_train_data(inputs=packed, targets=targets, strict=False)
        return packed

    def _step_inputs(self, base: Tensor, rows: SurrogateRows, targets: Tensor) -> Tensor:
        """Packed inputs ``[N, P]`` of one training step.

        With a featurizer the embedding changes every step, so they are recomputed and set as the
        model's training inputs each time; without one they are ``base``, set once before training.
        """
        if self._weights is None:
            return base
        assert self._model is not None
        packed = self._pack(base, rows)
        self._model.set_train_data(inputs=packed, targets=targets, strict=False)
        return packed


__all__ = ["DeepKernelSurrogate"]
