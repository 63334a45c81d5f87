from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_fms.weights import TOPOLOGY_CACHE, GMNFeaturizer, build_featurizer, permute_hidden_units

from ._models import DataDependent, TinyResNet, TransformerBlock, cnn, mlp, randomize_bn

TOL = 1e-5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gmn() -> GMNFeaturizer:
    torch.manual_seed(0)
    return build_featurizer("gmn").double()  # type: ignore[return-value]


def permuted(module: nn.Module, edit) -> nn.Module:  # noqa: ANN001
    other = copy.deepcopy(module)
    with torch.no_grad():
        edit(module, other)
    return other


def same_function(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-10)


def test_mlp_invariance(gmn: GMNFeaturizer) -> None:
    m = mlp((3, 6, 5, 2)).double()
    p, q = torch.randperm(6, generator=gen(1)), torch.randperm(5, generator=gen(2))

    def edit(a: nn.Sequential, b: nn.Sequential) -> None:
        b[0].weight.copy_(a[0].weight[p])
        b[0].bias.copy_(a[0].bias[p])
        b[2].weight.copy_(a[2].weight[q][:, p])
        b[2].bias.copy_(a[2].bias[q])
        b[4].weight.copy_(a[4].weight[:, q])

    m2 = permuted(m, edit)
    same_function(m, m2, torch.randn(7, 3, dtype=torch.float64))
    assert (gmn([m]) - gmn([m2])).abs().max() < TOL


def test_cnn_invariance(gmn: GMNFeaturizer) -> None:
    m = cnn(4, 5).double()
    p, q = torch.randperm(4, generator=gen(3)), torch.randperm(5, generator=gen(4))

    def edit(a: nn.Sequential, b: nn.Sequential) -> None:
        b[0].weight.copy_(a[0].weight[p])
        b[0].bias.copy_(a[0].bias[p])
        b[2].weight.copy_(a[2].weight[q][:, p])
        b[2].bias.copy_(a[2].bias[q])
        b[5].weight.copy_(a[5].weight[:, q])

    m2 = permuted(m, edit)
    same_function(m, m2, torch.randn(2, 1, 9, 9, dtype=torch.float64))
    assert (gmn([m]) - gmn([m2])).abs().max() < TOL


def _bn(a: nn.BatchNorm2d, b: nn.BatchNorm2d, p: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(b, name).copy_(getattr(a, name)[p])


def test_resnet_invariance_through_skip(gmn: GMNFeaturizer) -> None:
    m = randomize_bn(TinyResNet(c=4, hidden=5)).double()
    p, q = torch.randperm(4, generator=gen(5)), torch.randperm(5, generator=gen(6))

    def edit(a: TinyResNet, b: TinyResNet) -> None:
        # p permutes the residual stream (stem, bn, skip, bn2, head input) consistently; q the block's hidden channels
        b.stem.weight.copy_(a.stem.weight[p])
        _bn(a.bn, b.bn, p)
        b.conv1.weight.copy_(a.conv1.weight[q][:, p])
        _bn(a.bn1, b.bn1, q)
        b.conv2.weight.copy_(a.conv2.weight[p][:, q])
        _bn(a.bn2, b.bn2, p)
        b.fc.weight.copy_(a.fc.weight[:, p])

    m2 = permuted(m, edit)
    same_function(m, m2, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert (gmn([m]) - gmn([m2])).abs().max() < TOL


def test_transformer_invariance_mlp_and_heads(gmn: GMNFeaturizer) -> None:
    d, heads, ff = 8, 2, 12
    hd = d // heads
    m = TransformerBlock(d=d, heads=heads, ff=ff).double()
    r = torch.randperm(ff, generator=gen(7))  # MLP hidden units
    order = torch.tensor([1, 0])  # swap the two heads
    qk = torch.cat([order[j] * hd + torch.randperm(hd, generator=gen(8 + j)) for j in range(heads)])
    v = torch.cat([order[j] * hd + torch.randperm(hd, generator=gen(20 + j)) for j in range(heads)])
    rows = torch.cat([qk, d + qk, 2 * d + v])

    def edit(a: TransformerBlock, b: TransformerBlock) -> None:
        b.fc1.weight.copy_(a.fc1.weight[r])
        b.fc1.bias.copy_(a.fc1.bias[r])
        b.fc2.weight.copy_(a.fc2.weight[:, r])
        b.attn.in_proj_weight.copy_(a.attn.in_proj_weight[rows])
        b.attn.in_proj_bias.copy_(a.attn.in_proj_bias[rows])
        b.attn.out_proj.weight.copy_(a.attn.out_proj.weight[:, v])

    m2 = permuted(m, edit)
    same_function(m, m2, torch.randint(0, 11, (3, 6)))
    assert (gmn([m]) - gmn([m2])).abs().max() < TOL


def test_sensitivity(gmn: GMNFeaturizer) -> None:
    torch.manual_seed(1)
    a, b = mlp().double(), mlp().double()
    assert (gmn([a]) - gmn([b])).abs().max() > 1e-4
    c = copy.deepcopy(a)
    with torch.no_grad():
        c[2].weight[0, 0] += 0.5
    assert (gmn([a]) - gmn([c])).abs().max() > 1e-6
    r1, r2 = randomize_bn(TinyResNet(), 1).double(), randomize_bn(TinyResNet(), 2).double()
    assert (gmn([r1]) - gmn([r2])).abs().max() > 1e-4


def test_auto_trains_the_whole_gmn_on_gpu_and_the_readout_on_cpu() -> None:
    f = GMNFeaturizer(embedding_dim=8)
    assert f.trainable == "auto" and f.effective_trainable == "readout"
    out = f([mlp()], [("hub", "m")])
    out.sum().backward()
    trained = {n for n, p in f.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith("readout.") for n in trained)
    if torch.cuda.is_available():
        assert GMNFeaturizer().cuda().effective_trainable == "all"


def test_mixed_batch_and_gradients() -> None:
    torch.manual_seed(2)
    f = GMNFeaturizer(embedding_dim=16, trainable="all")
    modules = [mlp(), cnn(), TinyResNet(), TransformerBlock()]
    out = f(modules)
    assert out.shape == (4, 16) and out.dtype == torch.float32
    for i, m in enumerate(modules):
        assert torch.allclose(out[i], f([m])[0], atol=1e-5)
    out.pow(2).sum().backward()
    missing = [n for n, p in f.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_fallback_module_in_a_batch() -> None:
    TOPOLOGY_CACHE.clear()
    f = GMNFeaturizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = f([DataDependent(), mlp()])
        f([DataDependent()])
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    assert len(caught) == 1


def test_lean_no_grad_path_matches_autograd_path() -> None:
    torch.manual_seed(3)
    f = GMNFeaturizer().double()
    # 64*96 = 6144 edges: a dense block handled by reshapes; the rest by scatter
    modules = [mlp((5, 64, 96, 3)).double(), randomize_bn(TinyResNet()).double(), TransformerBlock().double()]
    with_grad = f(modules)
    with torch.no_grad():
        lean = f(modules)
    assert torch.allclose(with_grad, lean, atol=1e-10)


def test_keys_cache_values_and_batches() -> None:
    torch.manual_seed(4)
    f = GMNFeaturizer()
    modules = [mlp() for _ in range(5)]
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
    assert f([mlp().double()]).dtype == torch.float64
    assert f([]).shape == (0, 8)


def test_readout_only_training_caches_the_trunk() -> None:
    torch.manual_seed(5)
    full = GMNFeaturizer().double()
    frozen = GMNFeaturizer(trainable="readout").double()
    frozen.load_state_dict(full.state_dict())
    modules = [mlp().double(), TinyResNet().double()]
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
    m = mlp((3, 6, 5, 2)).double()
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
