"""What a simulated epoch "trains" to: a deterministic learning curve per configuration, and weights to match.

The simulated cluster (:mod:`lightning_fms.parallel.simulation`) never trains; it looks the value of
``(configuration, epoch)`` up in a :class:`LearningCurves`:

* :class:`SyntheticCurves`: a smooth function of the encoded configuration (so a surrogate has something to
  learn), whose curves rise at configuration-dependent rates, cross, and some overfit late; with a little
  noise per ``(configuration, epoch)``. Every number derives from the seed and the configuration, never from
  the order in which epochs are asked for.
* :class:`TabulatedCurves`: a table of real curves, such as a benchmark pool's (``pool.configs``,
  ``pool.val``), with the weights the real training left when the table has them.

When a study records weights, the weights after an epoch are the pretrained weights moved along a direction
fixed per configuration, further at later epochs (:func:`drifted_weights`), unless the table has real ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from lightning_fms.errors import FMSError
from lightning_fms.search.seeds import derive_seed
from lightning_fms.search.space import SearchSpace
from lightning_fms.search.trial import config_key

__all__ = ["LearningCurves", "SyntheticCurves", "TabulatedCurves", "drifted_weights"]

StateDict = dict[str, torch.Tensor]


@runtime_checkable
class LearningCurves(Protocol):
    """The value of the monitored metric after each epoch of each configuration."""

    def value(self, config: Mapping[str, Any], epoch: int) -> float:
        """The monitored value after 1-based ``epoch`` of ``config`` (deterministic)."""
        ...

    def weights(self, config: Mapping[str, Any], epoch: int, pretrained: StateDict | None) -> StateDict | None:
        """The network's weights after ``epoch`` (``None``: none to give; ``pretrained``: the run's ``W_0``)."""
        ...


def drifted_weights(pretrained: StateDict, seed: int, progress: float, jitter: int) -> StateDict:
    """``W_0`` moved along a seeded direction: ``W = W_0 + s * (progress * D + 0.1 * E_jitter)``.

    Args:
        pretrained: ``W_0`` (floating tensors move; others are copied).
        seed: Seeds the direction ``D`` (one per configuration).
        progress: How far along ``D``, in ``[0, 1]`` (how far training has moved the weights).
        jitter: Seeds the small per-epoch term ``E``.

    Returns:
        A new state dict with ``pretrained``'s keys, shapes and dtypes; ``s`` is 5% of each tensor's scale.
    """
    direction = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(jitter)
    out: StateDict = {}
    for name, tensor in pretrained.items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        base = tensor.detach().to(torch.float32)
        scale = 0.05 * (float(base.abs().mean()) + 1e-3)
        step = progress * torch.randn(base.shape, generator=direction) + 0.1 * torch.randn(base.shape, generator=noise)
        out[name] = (base + scale * step).to(tensor.dtype)
    return out


class SyntheticCurves:
    """Learning curves from a seeded function of the encoded configuration (values in ``[0, 1]``, larger better).

    With ``x`` the configuration in the unit cube (:meth:`SearchSpace.encode`), the final value is
    ``floor + (ceiling - floor) * exp(-|x - u|_w^2)`` for a seeded optimum ``u`` and relevance ``w``; the
    curve rises to it as ``1 - exp(-r t)`` at a rate ``r`` that is another function of ``x`` (fast starters are
    not the best), a seeded share of the space loses accuracy after ``overfit_after`` epochs, and each value
    gets Gaussian noise of standard deviation ``noise`` seeded by ``(seed, configuration, epoch)``.

    Args:
        space: The search space the configurations come from.
        seed: Seeds the function.
        noise: Standard deviation of the per-epoch noise.
        overfit_after: Epoch after which overfitting configurations decline.
    """

    def __init__(self, space: SearchSpace, seed: int = 0, noise: float = 0.005, overfit_after: int = 10) -> None:
        if noise < 0 or not math.isfinite(noise):
            raise FMSError(f"noise must be a finite number >= 0, got {noise!r}")
        self.space = space
        self.seed = int(seed)
        self.noise = float(noise)
        self.overfit_after = int(overfit_after)
        rng = np.random.default_rng(derive_seed(self.seed, "synthetic curves"))
        dim = space.dim
        self._optimum = rng.uniform(0.15, 0.85, dim)
        self._relevance = rng.uniform(0.5, 3.0, dim) * (1.2 / max(dim, 1))
        self._rate_direction = rng.normal(0.0, 1.5, dim)
        self._overfit_direction = rng.normal(0.0, 1.5, dim)

    def _shape(self, config: Mapping[str, Any]) -> tuple[float, float, float]:
        """``(final value, rate per epoch, overfit slope per epoch)`` of ``config``."""
        x = self.space.encode(config).numpy()
        distance = float(np.sum(self._relevance * (x - self._optimum) ** 2))
        final = 0.3 + 0.68 * math.exp(-distance)
        rate = 0.08 + 0.6 / (1.0 + math.exp(-float(self._rate_direction @ (x - 0.5))))
        overfit = 0.006 / (1.0 + math.exp(-float(self._overfit_direction @ (x - 0.5)) - 1.0))
        return final, rate, overfit

    def progress(self, config: Mapping[str, Any], epoch: int) -> float:
        """How far ``config`` has come after ``epoch`` epochs, ``1 - exp(-r * epoch)`` in ``[0, 1)``."""
        _, rate, _ = self._shape(config)
        return 1.0 - math.exp(-rate * epoch)

    def value(self, config: Mapping[str, Any], epoch: int) -> float:
        """The value after ``epoch`` of ``config``, clipped to ``[0, 1]``."""
        if epoch < 1:
            raise FMSError(f"epoch must be >= 1, got {epoch}")
        final, rate, overfit = self._shape(config)
        start = 0.2
        value = final - (final - start) * math.exp(-rate * epoch) - overfit * max(0, epoch - self.overfit_after)
        draw = np.random.default_rng(derive_seed(self.seed, "noise", config_key(dict(config)), epoch)).normal()
        return float(min(1.0, max(0.0, value + self.noise * draw)))

    def weights(self, config: Mapping[str, Any], epoch: int, pretrained: StateDict | None) -> StateDict | None:
        """``pretrained`` drifted by this configuration's progress (:func:`drifted_weights`); ``None`` without it."""
        if pretrained is None:
            return None
        key = config_key(dict(config))
        return drifted_weights(
            pretrained,
            derive_seed(self.seed, "weights", key),
            self.progress(config, epoch),
            derive_seed(self.seed, "weights", key, epoch),
        )


class TabulatedCurves:
    """Learning curves read from a table: ``values[i, k - 1]`` after epoch ``k`` of ``configs[i]``.

    Args:
        configs: ``N`` configurations (the study should choose among exactly these: pass them to the optimizer
            as ``configurations``).
        values: ``[N, E]`` values.
        load_module: ``(index, epoch) -> module`` with the weights the real training left after ``epoch`` of
            ``configs[index]`` (a benchmark pool's ``load_module``); ``None``: weights drift from ``W_0`` as in
            :func:`drifted_weights`.
        seed: Seeds the drifted weights (without ``load_module``).
    """

    def __init__(
        self,
        configs: Sequence[Mapping[str, Any]],
        values: Any,
        load_module: Callable[[int, int], nn.Module] | None = None,
        seed: int = 0,
    ) -> None:
        table = np.asarray(values, dtype=np.float64)
        if table.ndim != 2 or table.shape[0] != len(configs) or table.shape[1] < 1:
            raise FMSError(f"values must be [N, E] with N = {len(configs)} configurations, got {list(table.shape)}")
        self.configs = [dict(c) for c in configs]
        self.values = table
        self.load_module = load_module
        self.seed = int(seed)
        self._index = {config_key(c): i for i, c in enumerate(self.configs)}

    @classmethod
    def from_pool(cls, pool: Any) -> TabulatedCurves:
        """The curves (``pool.val``) and weights (``pool.load_module``) of a benchmark pool."""
        return cls(pool.configs, pool.val, load_module=pool.load_module)

    @property
    def epochs(self) -> int:
        """``E``: the epochs each configuration's curve has."""
        return int(self.values.shape[1])

    def _row(self, config: Mapping[str, Any], epoch: int) -> int:
        index = self._index.get(config_key(dict(config)))
        if index is None:
            raise FMSError("the configuration is not in the table (give the optimizer the table's configurations)")
        if not 1 <= epoch <= self.epochs:
            raise FMSError(f"epoch {epoch} is beyond the table's {self.epochs} epochs")
        return index

    def value(self, config: Mapping[str, Any], epoch: int) -> float:
        """``values[i, epoch - 1]`` for the configuration's row ``i``."""
        return float(self.values[self._row(config, epoch), epoch - 1])

    def weights(self, config: Mapping[str, Any], epoch: int, pretrained: StateDict | None) -> StateDict | None:
        """The table's weights after ``epoch``, or ``pretrained`` drifted by ``epoch / E``; ``None`` without either."""
        index = self._row(config, epoch)
        if self.load_module is not None:
            return {k: v.detach().clone() for k, v in self.load_module(index, epoch).state_dict().items()}
        if pretrained is None:
            return None
        return drifted_weights(
            pretrained,
            derive_seed(self.seed, "weights", index),
            epoch / self.epochs,
            derive_seed(self.seed, index, epoch),
        )
