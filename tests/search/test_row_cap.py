"""The cap on the surrogate's training rows keeps the longest trials whole."""

from __future__ import annotations

from lightning_fms.search.row_cap import cap_rows
from lightning_fms.search.rows import RowSpec


def _rows(lengths: list[int]) -> list[RowSpec]:
    return [
        RowSpec({"lr": float(t)}, k, tuple(0.5 for _ in range(k - 1)), ("trial", t, k - 1))
        for t, length in enumerate(lengths)
        for k in range(1, length + 1)
    ]


def test_under_the_cap_every_row_is_kept():
    specs = _rows([3, 2, 1])
    assert cap_rows(specs, 10, seed=0) == list(range(6))
    assert cap_rows(specs, None, seed=0) == list(range(6))


def test_the_longest_trials_are_kept_whole_and_the_rest_subsampled():
    specs = _rows([2, 9, 1, 7, 3, 3, 3])
    kept = cap_rows(specs, 20, seed=0)
    assert len(kept) == 20 and kept == sorted(set(kept))
    trials = [specs[i].config["lr"] for i in kept]
    assert trials.count(1.0) == 9 and trials.count(3.0) == 7  # the two longest, every row
    assert cap_rows(specs, 20, seed=0) == kept  # seeded
    assert cap_rows(specs, 20, seed=1) != kept  # the subsample of the others depends on the seed


def test_the_cap_bounds_the_rows_of_a_long_study():
    specs = _rows([20] * 40 + [1] * 200)
    assert len(cap_rows(specs, 500, seed=0)) == 500
