"""Names of a search space's encoded columns: the key that carries learned parameters from task to task.

A float or int parameter is one column named after it (``"model.lr"``); a categorical one is one column per choice
(``"data.batch_size=32"``); the hub choice is one column per entry (``"hub=cnn-m"``). Two tasks whose spaces share
non-hub parameters share those columns by name; hub entries are shared when both hubs have an entry of that name.
With the frozen-layer fidelity the surrogate reads one more column, :data:`FRACTION_COLUMN`.
"""

from __future__ import annotations

from lightning_fms.search.space import CategoricalParam, HubChoice, SearchSpace

#: The extra column of the frozen-layer fidelity (the trainable fraction of layer units).
FRACTION_COLUMN = "<trainable fraction>"


def encoded_column_names(space: SearchSpace, frozen_layers: bool = False) -> list[str]:
    """One name per column of ``space.encode`` (plus :data:`FRACTION_COLUMN` with the frozen-layer fidelity).

    Args:
        space: The search space.
        frozen_layers: Whether the surrogate's rows carry the trainable-fraction column after the encoding.

    Returns:
        ``space.dim (+ 1)`` distinct names, in column order.
    """
    names: list[str] = []
    for name in space:
        param = space[name]
        if isinstance(param, (CategoricalParam, HubChoice)):
            names.extend(f"{name}={choice}" for choice in param.choices)
        else:
            names.append(name)
    if frozen_layers:
        names.append(FRACTION_COLUMN)
    assert len(names) == space.dim + (1 if frozen_layers else 0), "a parameter's encoding width changed"
    return names


def is_hub_column(space: SearchSpace, column: str) -> bool:
    """Whether ``column`` (a name from :func:`encoded_column_names`) is one of the hub choice's columns."""
    return space.hub_key is not None and column.startswith(f"{space.hub_key}=")


__all__ = ["FRACTION_COLUMN", "encoded_column_names", "is_hub_column"]
