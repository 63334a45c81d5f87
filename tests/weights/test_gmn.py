from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lightning_fms.testing.networks import (
    DataDependentNet,
    TinyResidualNet,
    TinyTransformer,
    randomize_batchnorm,
    tiny_cnn,
    tiny_mlp,
)
from lightning_fms.weights import TOPOLOGY_CACHE, GMNFeaturizer, build_featurizer, permute_hidden_units
from lightning_fms.zoo.deepsets import DeepSets

TOL = 1e-5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gmn() -> GMNFeaturizer:
    torch.manual_seed(0)
    return build_featurizer("gmn").double()  # type: ignore[return-value]


def test_sensitivity(gmn: GMNFeaturizer) -> None:
    torch.manual_seed(1)
    a, b = tiny_mlp().double(), tiny_mlp().double()
    assert (gmn([a]) - gmn([b])).abs().max() > 1e-4
    c = copy.deepcopy(a)
    with torch.no_grad():
        c[2].weight[0, 0] += 0.5
    assert (gmn([a]) - gmn([c])).abs().max() > 1e-6
    r1, r2 = randomize_batchnorm(TinyResidualNet(), 1).double(), randomize_batchnorm(TinyResidualNet(), 2).double()
    assert (gmn([r1]) - gmn([r2])).abs().max() > 1e-4


def test_zoo_deepsets_embedding_ignores_the_order_of_its_hidden_units(gmn: GMNFeaturizer) -> None:
    def deepsets(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return randomize_batchnorm(DeepSets(image_size=4, hidden=6, num_classes=3), seed).double().eval()

    m = deepsets(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # traced: no statistics fallback
        base = gmn([m])
    for seed in range(3):
        p = permute_hidden_units(m, gen(seed))
        assert any(not torch.equal(a, b) for a, b in zip(m.state_dict().values(), p.state_dict().values()))
        assert torch.allclose(gmn([p]), base, atol=TOL)
    assert (gmn([deepsets(1)]) - base).abs().max() > 100 * TOL  # other weights embed differently


def test_auto_trains_the_whole_gmn_on_gpu_and_the_readout_on_cpu() -> None:
    f = GMNFeaturizer(embedding_dim=8)
    assert f.trainable == "auto" and f.effective_trainable == "readout"
    out = f([tiny_mlp()], [("hub", "m")])
    out.sum().backward()
    trained = {n for n, p in f.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith("readout.") for n in trained)
    if torch.cuda.is_available():
        assert GMNFeaturizer().cuda().effective_trainable == "all"


def test_mixed_batch_gradients_reach_every_parameter() -> None:
    torch.manual_seed(2)
    f = GMNFeaturizer(embedding_dim=16, trainable="all")
    modules = [tiny_mlp(), tiny_cnn(), TinyResidualNet(), TinyTransformer()]
    out = f(modules)
    assert out.shape == (4, 16) and out.dtype == torch.float32
    out.pow(2).sum().backward()
    missing = [n for n, p in f.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_fallback_module_in_a_batch() -> None:
    TOPOLOGY_CACHE.clear()
    f = GMNFeaturizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = f([DataDependentNet(), tiny_mlp()])
        f([DataDependentNet()])
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    assert len(caught) == 1


def test_lean_no_grad_path_matches_autograd_path() -> None:
    torch.manual_seed(3)
    f = GMNFeaturizer().double()
    # 64*96 = 6144 edges: a dense block handled by reshapes; the rest by scatter
    modules = [
        tiny_mlp((5, 64, 96, 3)).double(),
        randomize_batchnorm(TinyResidualNet()).double(),
        TinyTransformer().double(),
    ]
    with_grad = f(modules)
    with torch.no_grad():
        lean = f(modules)
    assert torch.allclose(with_grad, lean, atol=1e-10)


def test_keys_cache_values_and_batches() -> None:
    torch.manual_seed(4)
    f = GMNFeaturizer()
    modules = [tiny_mlp() for _ in range(5)]
    keys = [f"trial{i}/epoch3" for i in range(5)]
    a = f(modules, keys)
    static = f.graph_inputs(modules, keys)
    assert f.graph_inputs(modules, keys) is static  # cached batch: no re-extraction
    with torch.no_grad():
        modules[0][0].weight.add_(1.0)  # same key: the cached values are used, by contract
    assert torch.equal(f(modules, keys), a)
    assert not torch.equal(f(modules), a)  # no keys: values re-read
    assert f._values.hits >= 0 and len(f._values) == 5


def test_double_and_empty() -> None:
    f = GMNFeaturizer(embedding_dim=8).double()
    assert f([tiny_mlp().double()]).dtype == torch.float64
    assert f([]).shape == (0, 8)


def test_readout_only_training_caches_the_trunk() -> None:
    torch.manual_seed(5)
    full = GMNFeaturizer().double()
    frozen = GMNFeaturizer(trainable="readout").double()
    frozen.load_state_dict(full.state_dict())
    modules = [tiny_mlp().double(), TinyResidualNet().double()]
    keys = ["a", "b"]
    out = frozen(modules, keys)
    assert torch.allclose(out, full(modules), atol=1e-10)  # same function, frozen trunk
    out.sum().backward()
    trained = {n for n, p in frozen.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in frozen.readout.named_parameters(prefix="readout")}
    assert len(frozen._pooled) == 2
    with torch.no_grad():
        modules[0][0].weight.add_(1.0)
    assert torch.allclose(frozen(modules, keys), out)  # trunk output cached by key
    assert not torch.allclose(frozen(modules)[0], out[0])


def test_dense_blocks_of_a_batch_match_single_graphs() -> None:
    from lightning_fms.weights._batch import static_batch

    torch.manual_seed(6)
    f = GMNFeaturizer().double()
    m = tiny_mlp((3, 6, 5, 2)).double()
    p = permute_hidden_units(m, gen(9))
    batch = [m, p] * 20  # 40 graphs of one architecture: the 6->5 layer of all of them is one dense block
    g = static_batch([TOPOLOGY_CACHE.get(x, f.graph_options) for x in batch])
    assert [(d.blocks, d.out, d.inn) for d in g.dense] == [(40, 5, 6)] and g.edge_perm is not None
    single = f([m])
    out = f(batch)
    with torch.no_grad():
        lean = f(batch)
    assert (out - single).abs().max() < TOL  # dense blocks == scatter path, and permutation invariant
    assert (lean - out).abs().max() < 1e-10
