"""permute_hidden_units: real neuron permutations keep the network function."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_fms.testing.featurizers import FeaturizerContract, contract_networks
from lightning_fms.testing.networks import TinyResidualNet, TinyTransformer, randomize_batchnorm, tiny_cnn, tiny_mlp
from lightning_fms.weights import FlatFeaturizer, permute_hidden_units
from lightning_fms.weights.permutation import plan_for
from lightning_fms.zoo.deepsets import DeepSets


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "make,inputs",
    [
        (lambda: tiny_mlp((3, 6, 5, 2)), lambda: torch.randn(4, 3)),
        (lambda: tiny_cnn(4, 5), lambda: torch.randn(2, 1, 8, 8)),
        (lambda: randomize_batchnorm(TinyResidualNet()).eval(), lambda: torch.randn(2, 3, 6, 6)),
        (lambda: TinyTransformer(), lambda: torch.randint(0, 11, (2, 6))),
        (lambda: randomize_batchnorm(DeepSets(image_size=4, hidden=5, num_classes=3)), lambda: torch.randn(2, 1, 4, 4)),
    ],
    ids=["mlp", "cnn", "resnet", "transformer", "deepsets"],
)
def test_permute_hidden_units_keeps_the_function(make, inputs) -> None:  # noqa: ANN001
    torch.manual_seed(1)
    m = make().double().eval()
    x = inputs()
    x = x.double() if x.is_floating_point() else x
    flat = FlatFeaturizer(include_buffers=True)
    for seed in range(3):
        p = permute_hidden_units(m, gen(seed)).eval()
        with torch.no_grad():
            assert torch.allclose(m(x), p(x), atol=1e-10)
        assert not torch.equal(flat.flatten(m), flat.flatten(p))


def test_permute_hidden_units_on_a_state_dict() -> None:
    m = tiny_mlp((3, 6, 5, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    for state in (permute_hidden_units(m.state_dict(), gen(0)), permute_hidden_units(m.state_dict(), gen(0), module=m)):
        other = copy.deepcopy(m)
        other.load_state_dict(state)
        assert torch.allclose(m(x), other(x), atol=1e-12)
        assert any(not torch.equal(state[k], v) for k, v in m.state_dict().items())


def test_the_contract_seeds_include_a_swap_of_attention_heads() -> None:
    """FeaturizerContract permutes heads too: one of its seeds reorders the heads of its transformer."""
    transformer = next(m for m in contract_networks() if isinstance(m, TinyTransformer))
    plan = plan_for(transformer)
    assert plan is not None and len(plan.attention) == 1
    q_root, _, width, heads = plan.attention[0]
    first_head = [
        int(plan.sample(torch.Generator().manual_seed(seed))[q_root][0]) // (width // heads)
        for seed in FeaturizerContract.permutation_seeds
    ]
    assert any(h != 0 for h in first_head)  # with 2 heads: the heads swap places
    assert any(h == 0 for h in first_head)
