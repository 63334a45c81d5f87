"""``weights="auto"``: the summary featurizer for the fms searcher on a hub, no weights otherwise."""

from __future__ import annotations

from lightning_fms.search.searcher import AUTO_FEATURIZER, build_searcher, resolve_weights
from lightning_fms.search.space import SearchSpace

LR = {"model.lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True}}


def test_auto_reads_weights_only_for_fms_on_a_hub():
    hub_space = SearchSpace.from_dict({"hub": {"type": "hub"}, **LR}, hub_entries=["a", "b"])
    plain_space = SearchSpace.from_dict(LR)
    assert resolve_weights("fms", hub_space, "auto") == AUTO_FEATURIZER == "summary"
    assert resolve_weights("fms", plain_space, "auto") == "none"  # no hub entry to start from
    assert resolve_weights("dyhpo", hub_space, "auto") == "none"  # the paper's DyHPO
    assert resolve_weights("dyhpo", hub_space, "stats") == "stats"  # explicit choices stay
    assert build_searcher("fms", hub_space, cap=5, weights="auto", device="cpu").uses_weights
    assert not build_searcher("fms", plain_space, cap=5, weights="auto", device="cpu").uses_weights
