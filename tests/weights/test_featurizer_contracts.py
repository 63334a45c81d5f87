"""Every featurizer, with each option that changes how it embeds, against the shipped contract suite."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import pytest
import torch
from torch import nn

from lightning_fms.testing.featurizers import FeaturizerContract
from lightning_fms.weights import Featurizer, StatsFeaturizer, build_featurizer


class TestGMN(FeaturizerContract):
    def make_featurizer(self) -> Featurizer:
        return build_featurizer("gmn", trainable="all")  # the default sizes


class TestGMNReadout(FeaturizerContract):
    def make_featurizer(self) -> Featurizer:
        return build_featurizer("gmn", embedding_dim=8, hidden_dim=8, num_blocks=2, trainable="readout")


class TestGMNWithoutRunningStats(FeaturizerContract):
    def make_featurizer(self) -> Featurizer:
        return build_featurizer("gmn", embedding_dim=8, hidden_dim=8, num_blocks=2, include_running_stats=False)


@pytest.mark.filterwarnings("ignore:the 'nfn' featurizer embeds")
class TestNFN(FeaturizerContract):
    def make_featurizer(self) -> Featurizer:
        return build_featurizer("nfn", trainable="all")


@pytest.mark.filterwarnings("ignore:the 'nfn' featurizer embeds")
class TestNFNReadout(FeaturizerContract):
    def make_featurizer(self) -> Featurizer:
        return build_featurizer("nfn", embedding_dim=8, channels=4, hidden_dim=16, trainable="readout")


class TestFLAT(FeaturizerContract):
    permutation_invariant = False  # flattened weights in storage order: permutations only augment its training

    def make_featurizer(self) -> Featurizer:
        return build_featurizer("flat", trainable="all")


class TestFLATReadout(FeaturizerContract):
    permutation_invariant = False

    def make_featurizer(self) -> Featurizer:
        return build_featurizer("flat", embedding_dim=8, hidden_dim=16, trainable="readout", include_buffers=True)


class TestStats(FeaturizerContract):
    def make_featurizer(self) -> Featurizer:
        return build_featurizer("stats")


class TestStatsSpreadWithBuffers(FeaturizerContract):
    def make_featurizer(self) -> Featurizer:
        return build_featurizer("stats", embedding_dim=8, num_tensors=4, selection="spread", include_buffers=True)


class TestSummary(FeaturizerContract):
    def make_featurizer(self) -> Featurizer:
        return build_featurizer("summary")


class TestSummaryWithBuffers(FeaturizerContract):
    def make_featurizer(self) -> Featurizer:
        return build_featurizer("summary", include_buffers=True)


# ------------------------------------------------------------------ the suite rejects featurizers that break it


class _ReadsTheFirstWeight(StatsFeaturizer):
    """Adds the first weight entry of each module: sees the order of hidden units."""

    def forward(self, modules: Sequence[nn.Module], keys: Sequence[Hashable] | None = None) -> torch.Tensor:
        out = super().forward(modules, keys)
        first = [next(m.parameters()).detach().flatten()[0] for m in modules]
        return out + torch.stack(first).to(out.dtype).unsqueeze(1) if modules else out


class _CentresTheBatch(StatsFeaturizer):
    """Subtracts the batch mean: a module's embedding depends on the rest of the batch."""

    def forward(self, modules: Sequence[nn.Module], keys: Sequence[Hashable] | None = None) -> torch.Tensor:
        out = super().forward(modules, keys)
        return out - out.mean(0, keepdim=True) if modules else out


class _ForgetsAPart(StatsFeaturizer):
    """Builds an offset on first use without registering it: the offset is not in the state dict."""

    def forward(self, modules: Sequence[nn.Module], keys: Sequence[Hashable] | None = None) -> torch.Tensor:
        out = super().forward(modules, keys)
        if not hasattr(self, "offset"):
            self.offset = torch.randn(self.embedding_dim, dtype=out.dtype)
        return out + self.offset


def contract_for(cls: type[Featurizer], invariant: bool = True) -> FeaturizerContract:
    contract = FeaturizerContract()
    contract.make_featurizer = lambda: cls(embedding_dim=8)  # type: ignore[method-assign]
    contract.permutation_invariant = invariant
    return contract


def test_the_suite_rejects_a_featurizer_that_sees_neuron_order() -> None:
    contract = contract_for(_ReadsTheFirstWeight)
    contract.test_batch_equals_one_by_one()
    contract.test_state_dict_round_trip()
    with pytest.raises(AssertionError, match="permutation seed"):
        contract.test_neuron_permutations()


def test_the_suite_rejects_a_featurizer_declared_variant_that_is_invariant() -> None:
    with pytest.raises(AssertionError, match="ignore the permutation"):
        contract_for(StatsFeaturizer, invariant=False).test_neuron_permutations()


def test_the_suite_rejects_a_featurizer_whose_rows_depend_on_the_batch() -> None:
    contract = contract_for(_CentresTheBatch)
    contract.test_neuron_permutations()
    with pytest.raises(AssertionError, match="one by one"):
        contract.test_batch_equals_one_by_one()


def test_the_suite_rejects_a_featurizer_that_loses_state() -> None:
    contract = contract_for(_ForgetsAPart)
    contract.test_batch_equals_one_by_one()
    with pytest.raises(AssertionError, match="loaded state"):
        contract.test_state_dict_round_trip()
