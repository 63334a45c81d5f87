"""The "plain GP" baseline: an exact GP on ``[x, budget]`` (no curve, no weights, no neural network)."""

from __future__ import annotations

from typing import Any

import gpytorch
import torch
from torch import Tensor

from lightning_fms.surrogate._base import SurrogateRows
from lightning_fms.surrogate.exact_gp import ExactGPModel, ExactGPSurrogateBase


class PlainGPSurrogate(ExactGPSurrogateBase):
    """Exact GP with an ARD Matern-5/2 kernel on ``[x, budget]``, refitted from scratch every time.

    Targets are standardised inside and the posterior is mapped back; ``posterior`` returns the latent
    variance (no observation noise). Determinism, failure recovery (revert, retry with a larger
    Cholesky jitter, else the prior) and the state format follow
    :class:`~lightning_fms.surrogate.exact_gp.ExactGPSurrogateBase`.

    Args:
        x_dim: Number of encoded hyperparameters ``D``.
        curve_length: Accepted for a uniform constructor; curves are ignored.
        device: Where to fit; ``None`` picks CUDA when available, else the CPU.
        steps: Adam steps per fit (50: the setting of the project's first benchmark, where this baseline
            ranked first; every decision refits from scratch, so the steps are its whole cost).
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
        steps: int = 50,
        learning_rate: float = 0.1,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(x_dim=x_dim, curve_length=curve_length, device=device, dtype=dtype)
        self.steps = int(steps)
        self.learning_rate = float(learning_rate)

    def _config(self) -> dict[str, Any]:
        return {"x_dim": self.x_dim, "dtype": str(self.dtype)}

    def packed_width(self) -> int:
        """Width of the packed inputs, ``D + 1``."""
        return self.x_dim + 1

    def x_column_parameters(self) -> dict[str, int]:
        """The ARD lengthscales ``[1, D + 1]`` (the last one is the budget's)."""
        return {"covar_module.base_kernel.raw_lengthscale": 1}

    def _build_model(self, train_inputs: Tensor, train_targets: Tensor) -> ExactGPModel:
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        base_kernel = gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=int(train_inputs.shape[-1]))
        return ExactGPModel(train_inputs, train_targets, likelihood, base_kernel).to(self.device, self.dtype)

    def _inputs(self, rows: SurrogateRows, mu: float, std: float) -> Tensor:
        """``[x, budget]`` as ``[N, D + 1]``."""
        return torch.cat([rows.x.to(self.device, self.dtype), rows.budget.to(self.device, self.dtype)[:, None]], -1)

    def _train(self, rows: SurrogateRows, targets: Tensor, mu: float, std: float, full: bool) -> Tensor:
        inputs = self._inputs(rows, mu, std)
        self._model = self._fresh_model(inputs, targets)
        self._maximise_likelihood(lambda: inputs, targets, self.steps, self.learning_rate)
        return inputs
