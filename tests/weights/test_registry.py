"""build_featurizer: names, defaults and one-line errors."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_fms.errors import FMSError
from lightning_fms.weights import (
    FEATURIZERS,
    FlatFeaturizer,
    GMNFeaturizer,
    NFNFeaturizer,
    StatsFeaturizer,
    SummaryFeaturizer,
    build_featurizer,
)


def test_registry() -> None:
    assert FEATURIZERS == ("gmn", "nfn", "flat", "stats", "summary")
    expected = {"gmn": GMNFeaturizer, "nfn": NFNFeaturizer, "flat": FlatFeaturizer, "stats": StatsFeaturizer}
    for name, cls in expected.items():
        f = build_featurizer(name, embedding_dim=7)
        assert isinstance(f, cls) and isinstance(f, nn.Module) and f.embedding_dim == 7
    assert build_featurizer("gmn").embedding_dim == 32
    assert (
        isinstance(build_featurizer("summary"), SummaryFeaturizer) and build_featurizer("summary").embedding_dim == 20
    )
    with pytest.raises(FMSError, match="known: gmn, nfn, flat, stats, summary") as err:
        build_featurizer("transformer")
    assert "\n" not in str(err.value)
    with pytest.raises(FMSError, match="unknown option"):
        build_featurizer("stats", hidden=3)
