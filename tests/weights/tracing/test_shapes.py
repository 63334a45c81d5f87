"""Where the features are after views, reductions, indexing and splits (pure functions, no graph)."""

from __future__ import annotations

import pytest

from lightning_fms.weights.tracing.shapes import (
    flatten,
    getitem,
    permute,
    reduce,
    reshape,
    slice_segments,
    split,
    squeeze,
    transpose,
    unsqueeze,
)
from lightning_fms.weights.tracing.values import FREE, Activation, RepeatedValue, Unsupported, ValueTuple

CONV_OUT = Activation(((0, 0, 4),), fdim=1, rank=4)  # [B, C=4, H, W]
TOKENS = Activation(((0, 0, 3), (1, 0, 5)), fdim=-1, rank=3)  # [B, L, 8]: two concatenated segments


def test_flattening_a_feature_map_records_the_layout() -> None:
    assert flatten(CONV_OUT, 1, -1) == Activation(CONV_OUT.segs, 1, 2, "major")  # x.flatten(1): c * k + r
    channels_last = permute(CONV_OUT, (0, 2, 3, 1))
    assert channels_last.fdim == 3
    assert flatten(channels_last, 1, -1) == Activation(CONV_OUT.segs, 1, 2, "minor")  # r * C + c
    assert reshape(CONV_OUT, (8, -1)) == flatten(CONV_OUT, 1, -1)  # x.view(B, -1)
    assert flatten(CONV_OUT, 2, 3) == Activation(CONV_OUT.segs, 1, 3)  # spatial dims only: features stay
    with pytest.raises(Unsupported, match="middle"):
        flatten(CONV_OUT, 0, 2)


def test_views_move_the_feature_dimension() -> None:
    assert transpose(TOKENS, 1, 2).fdim == 1
    assert transpose(TOKENS, 0, 1) == TOKENS
    assert unsqueeze(CONV_OUT, 0) == Activation(CONV_OUT.segs, 2, 5)
    assert unsqueeze(CONV_OUT, -1) == Activation(CONV_OUT.segs, 1, 5)
    assert squeeze(unsqueeze(CONV_OUT, 0), 0) == CONV_OUT
    assert reshape(TOKENS, (2, 3, 8)) == TOKENS  # same rank: nothing moves
    assert FREE is transpose(FREE, 0, 1)


def test_reductions_over_the_features_carry_no_neurons() -> None:
    assert reduce(TOKENS, -1, False) is FREE
    assert reduce(TOKENS, 1, False) == Activation(TOKENS.segs, 1, 2)  # mean over tokens
    assert reduce(TOKENS, 1, True) == TOKENS
    assert reduce(CONV_OUT, (2, 3), False) == Activation(CONV_OUT.segs, 1, 2)  # global average pooling
    assert reduce(CONV_OUT, None, False) is FREE


def test_indexing_and_splitting_the_features_selects_segments() -> None:
    assert slice_segments(TOKENS.segs, slice(2, 6)) == ((0, 2, 3), (1, 0, 3))
    assert getitem(TOKENS, (Ellipsis, slice(2, 6))).segs == ((0, 2, 3), (1, 0, 3))
    assert getitem(TOKENS, (slice(None), 0)) == Activation(TOKENS.segs, -1, 2)  # first token: features stay
    picked = getitem(TOKENS, (Ellipsis, 4))
    assert picked.segs == ((1, 1, 2),) and picked.fdim is None  # one feature, its dimension indexed away
    assert getitem(TOKENS, (slice(None), None)).rank == 4
    with pytest.raises(Unsupported, match="strided"):
        getitem(TOKENS, (Ellipsis, slice(None, None, 2)))
    halves = split(TOKENS, 2, -1, chunk=True)
    assert isinstance(halves, ValueTuple)
    assert [h.segs for h in halves.items] == [((0, 0, 3), (1, 0, 1)), ((1, 1, 5),)]
    assert split(TOKENS, [3, 5], -1, chunk=False).items[1].segs == ((1, 0, 5),)
    assert split(TOKENS, 1, 1, chunk=False) == RepeatedValue(TOKENS)  # along the tokens: every part has them all
