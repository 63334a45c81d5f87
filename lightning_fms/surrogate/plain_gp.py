"""The "plain GP" baseline: an exact GP on ``[x, budget]`` (no curve, no weights, no neural network)."""

from __future__ import annotations

from typing import Any

import gpytorch
import torch
from torch import Tensor

from lightning_fms.surrogate._base import SurrogateRows
from lightning_fms.surrogate.deep_kernel import ExactGPSurrogateBase


class _PlainGP(gpytorch.models.ExactGP):
    """``ConstantMean`` + ``ScaleKernel(Matern 5/2 with one lengthscale per input)``."""

    def __init__(
        self, train_inputs: Tensor, train_targets: Tensor, likelihood: gpytorch.likelihoods.GaussianLikelihood
    ) -> None:
        super().__init__(train_inputs, train_targets, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        dims = int(train_inputs.shape[-1])
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=dims))

    def forward(self, inputs: Tensor) -> gpytorch.distributions.MultivariateNormal:
        """Prior over inputs ``[N, D + 1]``."""
        return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs), self.covar_module(inputs))


class PlainGPSurrogate(ExactGPSurrogateBase):
    """Exact GP with an ARD Matern-5/2 kernel on ``[x, budget]``, refitted from scratch every time.

    Targets are standardised inside and the posterior is mapped back; ``posterior`` returns the latent
    variance (no observation noise). Determinism, failure recovery (revert, retry with a larger
    Cholesky jitter, else the prior) and the state format follow
    :class:`~lightning_fms.surrogate.deep_kernel.ExactGPSurrogateBase`.

    Args:
        x_dim: Number of encoded hyperparameters ``D``.
        curve_length: Accepted for a uniform constructor; curves are ignored.
        device: Where to fit; ``None`` picks CUDA when available, else the CPU.
        steps: Adam steps per fit.
        learning_rate: Adam learning rate.
        dtype: Floating type of the GP.

    """

    _FORMAT = "plain_gp/1"

    def __init__(
        self,
        *,
        x_dim: int,
        curve_length: int = 0,
        device: str | torch.device | None = None,
        steps: int = 100,
        learning_rate: float = 0.1,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(device=device, dtype=dtype)
        if x_dim < 0:
            raise ValueError(f"x_dim must be >= 0, got {x_dim}")
        self.x_dim = int(x_dim)
        self.curve_length = int(curve_length)
        self.steps = int(steps)
        self.learning_rate = float(learning_rate)

    def _config(self) -> dict[str, Any]:
        return {"x_dim": self.x_dim, "dtype": str(self.dtype)}

    def _validate(self, rows: SurrogateRows) -> None:
        self._check_rows(rows, self.x_dim)

    def _build_model(self, train_inputs: Tensor, train_targets: Tensor) -> gpytorch.models.ExactGP:
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        return _PlainGP(train_inputs, train_targets, likelihood).to(self.device, self.dtype)

    def _inputs(self, rows: SurrogateRows, mu: float, std: float) -> Tensor:
        return torch.cat([rows.x.to(self.device, self.dtype), rows.budget.to(self.device, self.dtype)[:, None]], -1)

    def _loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Negative exact marginal log-likelihood (per row) of one training step."""
        model = self._model
        assert model is not None
        return -self._mll(model(inputs), targets)

    def _train(self, rows: SurrogateRows, targets: Tensor, mu: float, std: float, full: bool) -> Tensor:
        inputs = self._inputs(rows, mu, std)
        self._model = model = self._build_model(inputs, targets)
        model.train()
        self._mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        self._optimise(list(model.parameters()), lambda: self._loss(inputs, targets), self.steps, self.learning_rate)
        return inputs
