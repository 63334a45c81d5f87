"""Reading edge values: kernels and flattened vectors onto the fixed kernel grid."""

from __future__ import annotations

import torch

from lightning_fms.weights.specs import kernel_to_grid

CENTRE = 4


def test_kernel_grid() -> None:
    one = kernel_to_grid(torch.ones(2, 1, 1), (3, 3))
    assert one[:, CENTRE].tolist() == [1, 1] and one.sum() == 2
    big = kernel_to_grid(torch.arange(25.0).reshape(1, 5, 5), (3, 3))
    assert big.shape == (1, 9)
    line = kernel_to_grid(torch.ones(1, 3), (3, 3))  # 1-d kernel of 3 taps: middle row
    assert line[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]
