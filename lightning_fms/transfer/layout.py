"""How a surrogate's parameters are laid out in a prior, independently of any one task's search space.

A surrogate model's trainable tensors fall into two kinds (:meth:`ExactGPSurrogateBase.x_column_parameters`):

* *shared* tensors, whose shape does not depend on the space (noise, output scales, the curve and weight terms,
  the deep kernel's later layers): stored under ``"<name>"``;
* *column* tensors, with one slice per encoded hyperparameter column along an axis (the plain-GP term's ARD
  lengthscales, the deep kernel's first layer): each column's slice is stored under ``"<name>@<column name>"``
  (:func:`~lightning_fms.transfer.columns.encoded_column_names`) and the space-independent rest (the budget's)
  under ``"<name>@tail"``.

Laying a prior onto a study's space (:func:`assemble`) takes each column by name; a hub entry the sources never
had gets the mean of the sources' hub columns (the prior knows how much the hub choice matters, not what this
entry does), and any other missing column keeps the model's default initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

TAIL = "tail"
"""The suffix of a column tensor's space-independent rest."""


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The entries of ``model.state_dict()`` a prior carries: floating tensors, constraint bounds left out.

    Args:
        model: A GPyTorch model (with its feature extractor).

    Returns:
        State-dict name -> tensor (detached), the parameters and floating buffers such as batch-norm statistics.
    """
    out: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        if not value.is_floating_point() or "_constraint." in name or name.endswith("active_dims"):
            continue
        out[name] = value.detach()
    return out


def column_key(name: str, column: str) -> str:
    """The prior's name of one column's slice of the column tensor ``name``."""
    return f"{name}@{column}"


def split(state: Mapping[str, Tensor], column_axes: Mapping[str, int], columns: Sequence[str]) -> dict[str, Tensor]:
    """A model state in a prior's space-independent layout.

    Args:
        state: State-dict name -> tensor (:func:`trainable_state`).
        column_axes: Column tensors: name -> axis (:meth:`x_column_parameters`).
        columns: The names of the ``D`` encoded columns the model was built for.

    Returns:
        Prior name -> tensor (each column's slice keeps its axis, with length 1).
    """
    out: dict[str, Tensor] = {}
    d = len(columns)
    for name, value in state.items():
        axis = column_axes.get(name)
        if axis is None:
            out[name] = value
            continue
        if value.shape[axis] < d:
            raise ValueError(f"{name} has {value.shape[axis]} entries along axis {axis}, fewer than {d} columns")
        for k, column in enumerate(columns):
            out[column_key(name, column)] = value.narrow(axis, k, 1)
        out[column_key(name, TAIL)] = value.narrow(axis, d, value.shape[axis] - d)
    return out


def assemble(
    flat: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    column_axes: Mapping[str, int],
    columns: Sequence[str],
    hub_prefix: str | None,
) -> dict[str, Tensor]:
    """Lay a prior's tensors onto a model built for ``columns`` (differentiably: meta-training calls it every step).

    Args:
        flat: Prior name -> tensor (:func:`split`'s layout).
        reference: The target model's own state (:func:`trainable_state`): shapes, and the values of what the
            prior does not have.
        column_axes: Column tensors of the target model: name -> axis.
        columns: The target's encoded column names, in order.
        hub_prefix: ``"<hub key>="``, the prefix of hub columns (``None``: the space has no hub choice).

    Returns:
        State-dict name -> tensor for every entry of ``reference`` that the prior covers.
    """
    out: dict[str, Tensor] = {}
    for name, target in reference.items():
        axis = column_axes.get(name)
        if axis is None:
            if name in flat:
                out[name] = flat[name]
            continue
        tail_key = column_key(name, TAIL)
        if tail_key not in flat:
            continue
        hub_slices = [v for k, v in flat.items() if hub_prefix and k.startswith(f"{name}@{hub_prefix}")]
        hub_mean = torch.stack(hub_slices).mean(dim=0) if hub_slices else None
        pieces = []
        for k, column in enumerate(columns):
            value = flat.get(column_key(name, column))
            if value is None and hub_prefix and column.startswith(hub_prefix) and hub_mean is not None:
                value = hub_mean
            if value is None:
                value = target.narrow(axis, k, 1)
            pieces.append(value)
        pieces.append(flat[tail_key])
        combined = torch.cat(pieces, dim=axis)
        if combined.shape != target.shape:
            raise ValueError(
                f"{name}: the prior gives shape {tuple(combined.shape)}, the model has {tuple(target.shape)}"
            )
        out[name] = combined
    return out


__all__ = ["TAIL", "assemble", "column_key", "split", "trainable_state"]
