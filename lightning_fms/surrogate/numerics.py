"""Small numerical helpers of the exact-GP surrogates: devices, seeded fits, GPyTorch settings, standardisation."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import gpytorch
import torch
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor, nn

#: Exact Cholesky algebra up to this many rows (GPyTorch would switch to CG/Lanczos at 800).
MAX_CHOLESKY_SIZE = 100_000


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


def cpu_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Return a detached CPU copy of ``module.state_dict()`` as a plain dict."""
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}


def check_finite(name: str, value: Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if ``value`` holds a NaN or an infinity."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


__all__ = [
    "MAX_CHOLESKY_SIZE",
    "check_finite",
    "cpu_state_dict",
    "gp_settings",
    "resolve_device",
    "seeded",
    "standardiser",
]
