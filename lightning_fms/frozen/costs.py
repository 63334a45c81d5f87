"""The frozen-layer cost model: FLOPs of one training step at each trainable fraction, relative to full training.

See :mod:`lightning_fms.frozen.levels` for why the model counts FLOPs rather than timing steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_fms.errors import FMSError
from lightning_fms.frozen.levels import units_for_fraction
from lightning_fms.frozen.units import layer_units, set_trainable_units


def step_flops(training_step: Callable[[], torch.Tensor]) -> int:
    """Floating-point operations of one forward + backward pass.

    Args:
        training_step: Returns a scalar loss (the forward); it is then back-propagated.
    """
    with FlopCounterMode(display=False) as counter:
        loss = training_step()
        if loss.requires_grad:
            loss.backward()
    return int(counter.get_total_flops())


def fraction_costs(
    module: nn.Module, net: nn.Module, batch: Any, fractions: Sequence[float], *, step: Callable[..., Any] | None = None
) -> tuple[int, tuple[float, ...]]:
    """Cost of a training step at each fraction, relative to full training (the cost model above).

    Args:
        module: The LightningModule (or any module) whose ``training_step(batch, 0)`` returns the loss
            (or a mapping with ``"loss"``); ``step`` replaces it.
        net: The part of ``module`` split into layer units (e.g. ``module.net``).
        batch: One training batch.
        fractions: Levels in ``(0, 1]``.
        step: ``step(batch) -> loss`` to use instead of ``module.training_step``.

    Returns:
        ``(n_units, costs)``; ``costs[i]`` is in ``(0, 1]`` for ``fractions[i]`` (1 at full training).
    """
    n_units = len(layer_units(net))
    was_training = module.training
    saved = {name: p.requires_grad for name, p in module.named_parameters()}

    def run() -> torch.Tensor:
        out = step(batch) if step is not None else module.training_step(batch, 0)  # type: ignore[operator]
        loss = out["loss"] if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor):
            raise FMSError("training_step must return a loss tensor to measure the frozen-layer cost model")
        return loss

    flops: dict[int, int] = {}
    try:
        module.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer warns
            for k in sorted({units_for_fraction(f, n_units) for f in fractions} | {n_units}):
                set_trainable_units(net, k)
                flops[k] = step_flops(run)
                module.zero_grad(set_to_none=True)
    finally:
        for name, p in module.named_parameters():
            p.requires_grad_(saved[name])
        module.train(was_training)
    full = flops[n_units]
    if full <= 0:  # nothing the counter knows (no matmul/conv): fall back to the share of units
        return n_units, tuple(units_for_fraction(f, n_units) / n_units for f in fractions)
    return n_units, tuple(min(1.0, flops[units_for_fraction(f, n_units)] / full) for f in fractions)
