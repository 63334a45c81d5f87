"""Batches of mixed architectures: one part per architecture, trained and saved with the featurizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fms.testing.networks import mixed_architectures, tiny_mlp
from lightning_fms.weights import build_featurizer


@pytest.mark.filterwarnings("ignore:the 'nfn' featurizer embeds")
@pytest.mark.parametrize("name", ["nfn", "flat"])
def test_one_part_per_architecture_and_every_part_is_trained(name: str) -> None:
    torch.manual_seed(5)
    modules = mixed_architectures()
    torch.manual_seed(6)
    f = build_featurizer(name, embedding_dim=8, trainable="all")
    out = f(modules)
    assert out.shape == (4, 8) and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    params = dict(f.named_parameters())
    parts = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith(("extra", "fallbacks")) else "") for k in params}
    expected = {"functional", "head", "extra_functionals.0", "extra_heads.0", "fallbacks.0", "fallbacks.1"}
    assert parts == (expected if name == "nfn" else {"mlp", "extra_mlps.0", "extra_mlps.1", "extra_mlps.2"})
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())  # every part is trained


def cpu_state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}  # tensors only


@pytest.mark.filterwarnings("ignore:the 'nfn' featurizer embeds")
@pytest.mark.parametrize("name", ["flat", "nfn", "gmn", "stats"])
def test_state_dict_round_trips_with_mixed_architectures(name: str) -> None:
    torch.manual_seed(5)
    modules = [*mixed_architectures(), tiny_mlp((3, 9, 4, 2))]
    torch.manual_seed(4)
    featurizer = build_featurizer(name).eval()
    init = cpu_state(featurizer)
    first = featurizer(modules[:2])  # parts appear as architectures arrive: recorded in two steps
    for key, value in cpu_state(featurizer).items():
        init.setdefault(key, value)
    out = featurizer(modules)
    assert torch.allclose(out[:2], first, atol=1e-6)
    for key, value in cpu_state(featurizer).items():
        init.setdefault(key, value)
    featurizer.load_state_dict(init)
    assert torch.allclose(featurizer(modules), out, atol=1e-6)
    torch.manual_seed(4)
    again = build_featurizer(name).eval()  # the parts depend on nothing but the order architectures are first seen
    again(modules[:1] + modules[:2] + modules)
    assert all(torch.equal(v, cpu_state(again)[k]) for k, v in cpu_state(featurizer).items())
    fresh = build_featurizer(name).eval()
    fresh.load_state_dict(cpu_state(featurizer))
    # the rebuilt parts belong to their architectures, not to the order the fresh featurizer sees them in
    assert torch.allclose(fresh(modules[::-1]), out.flip(0), atol=1e-6)
    assert torch.allclose(fresh(modules), out, atol=1e-6)
