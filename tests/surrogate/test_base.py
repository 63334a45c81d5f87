"""SurrogateRows: the batch the surrogate contract is written in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fms.surrogate import SurrogateRows


def rows(n: int = 3, **overrides) -> SurrogateRows:
    fields = {
        "x": torch.rand(n, 2),
        "budget": torch.full((n,), 0.5),
        "curves": torch.zeros(n, 4),
        "curve_lengths": torch.zeros(n, dtype=torch.long),
    }
    return SurrogateRows(**{**fields, **overrides})


def test_len_and_to_keep_every_field() -> None:
    modules = [nn.Linear(1, 1)]
    batch = rows(
        weight_index=torch.zeros(3, dtype=torch.long),
        weights=modules,
        weight_keys=["a"],
        reference_index=torch.zeros(1, dtype=torch.long),
    )
    moved = batch.to("cpu")
    assert len(moved) == 3 and moved.weights is modules and moved.weight_keys == ["a"]
    for name in ("x", "budget", "curves", "curve_lengths", "weight_index", "reference_index"):
        assert torch.equal(getattr(moved, name), getattr(batch, name))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"x": torch.rand(3)}, "x must be"),
        ({"budget": torch.ones(2)}, "budget"),
        ({"curve_lengths": torch.zeros(3, 1, dtype=torch.long)}, "curve_lengths"),
        ({"curves": torch.zeros(2, 4)}, "curves"),
        ({"weight_index": torch.zeros(3, dtype=torch.long)}, "together"),
        ({"reference_index": torch.zeros(1, dtype=torch.long)}, "needs weights"),
        (
            {
                "weight_index": torch.zeros(3, dtype=torch.long),
                "weights": [nn.Linear(1, 1)],
                "reference_index": torch.zeros(2, dtype=torch.long),
            },
            "reference_index must be",
        ),
        (
            {
                "weight_index": torch.zeros(3, dtype=torch.long),
                "weights": [nn.Linear(1, 1)],
                "reference_index": torch.ones(1, dtype=torch.long),
            },
            "index into",
        ),
    ],
)
def test_rejects_inconsistent_shapes(overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        rows(**overrides)
