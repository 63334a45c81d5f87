"""The traced structure of layers, residual streams and attention; what falls back and why."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lightning_fms.testing.networks import TinyResidualNet, TinyTransformer, tiny_cnn, tiny_mlp
from lightning_fms.weights import (
    EDGE_STATIC_FEATURES,
    NODE_STATIC_FEATURES,
    NODE_VALUE_FEATURES,
    TOPOLOGY_CACHE,
    EdgeType,
    NodeType,
    ParameterGraph,
)
from lightning_fms.weights.permutation import plan_for
from lightning_fms.zoo.deepsets import DeepSets

K = 9  # default 3x3 kernel grid
CENTRE = 4
NT = NODE_STATIC_FEATURES.index("type")
ET = K + EDGE_STATIC_FEATURES.index("type")


def node_types(g: ParameterGraph) -> list[int]:
    return g.node_attr[:, NT].long().tolist()


def edge_types(g: ParameterGraph) -> list[int]:
    return g.edge_attr[:, ET].long().tolist()


def test_cnn_counts_and_kernels() -> None:
    m = tiny_cnn(2, 3)  # Conv2d(1, 2, 3) -> Conv2d(2, 3, 3) -> pool -> flatten -> Linear(3, 2)
    g = ParameterGraph.from_module(m)
    # nodes: 1 input channel + 2 + 3 channels + 2 outputs; edges: one per channel pair 1*2 + 2*3 + 3*2
    assert (g.num_nodes, g.num_edges) == (8, 14)
    kernels = m[0].weight.detach().reshape(2, 9)
    assert torch.equal(g.edge_attr[:2, :K], kernels)
    assert edge_types(g) == [EdgeType.CONV] * 8 + [EdgeType.LINEAR] * 6
    assert g.edge_attr[0, K + EDGE_STATIC_FEATURES.index("kernel_h")] == 3


def test_conv_bn_and_resnet_counts() -> None:
    g = ParameterGraph.from_module(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    # 3 + 4 conv channels + 4 BN channels; 12 channel pairs + 4 identity edges
    assert (g.num_nodes, g.num_edges) == (11, 16)
    r = ParameterGraph.from_module(TinyResidualNet(c=4, hidden=5, classes=3))
    # nodes: in 3, stem 4, bn 4, conv1 5, bn1 5, conv2 4, bn2 4, residual sum 4, fc 3
    # edges: stem 12, bn 4, conv1 20, bn1 5, conv2 20, bn2 4, residual 4 + 4, fc 12
    assert (r.num_nodes, r.num_edges) == (36, 85)
    assert edge_types(r).count(EdgeType.RESIDUAL) == 8
    assert node_types(r).count(NodeType.ADD) == 4


def test_transformer_graph() -> None:
    g = ParameterGraph.from_module(TinyTransformer(d=8, heads=2, ff=12))
    t = node_types(g)
    for kind in (NodeType.ATTN_Q, NodeType.ATTN_K, NodeType.ATTN_V, NodeType.ATTN_OUT, NodeType.EMBEDDING):
        assert t.count(kind) == 8
    assert t.count(NodeType.ATTN_HEAD) == 2
    assert t.count(NodeType.PARAM_OP) == 8  # positional embedding
    assert (g.num_nodes, g.num_edges) == (104, 552)
    head = g.edge_attr[:, K + EDGE_STATIC_FEATURES.index("head")]
    q_edges = torch.tensor(edge_types(g)) == EdgeType.ATTN_Q
    assert sorted(set(head[q_edges].tolist())) == [0, 1]
    # embedding columns become node statistics of the embedding nodes
    model = TinyTransformer(d=8, heads=2, ff=12)
    g2 = ParameterGraph.from_module(model)
    emb = torch.tensor(node_types(g2)) == NodeType.EMBEDDING
    mean_col = len(NODE_STATIC_FEATURES) + NODE_VALUE_FEATURES.index("mean")
    assert torch.allclose(g2.node_attr[emb, mean_col], model.emb.weight.detach().mean(0))


def test_unsupported_layer_falls_back() -> None:
    TOPOLOGY_CACHE.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = ParameterGraph.from_module(nn.Sequential(nn.Linear(3, 4), nn.GRU(4, 4)))
    assert g.fallback and len(caught) == 1 and "GRU" in str(caught[0].message)


def test_user_written_layers_are_traced() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 3))
            self.b = nn.Parameter(torch.randn(5))
            self.scale = nn.Parameter(torch.ones(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.nn.functional.linear(x, self.w, self.b)
            return (h * self.scale).relu()

    g = ParameterGraph.from_module(Functional())
    assert not g.fallback
    assert (g.num_nodes, g.num_edges) == (3 + 5 + 5, 15 + 5)


def test_lightning_module_and_forward_defaults() -> None:
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self, lr: float = 1e-3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = tiny_mlp((8, 16, 3))

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, features: bool = False) -> torch.Tensor:
            h = self.net[1](self.net[0](x))
            if mask is not None:
                h = h * mask
            if features:
                return h
            return self.net[2](h)

    a, b = ParameterGraph.from_module(Classifier()), ParameterGraph.from_module(Classifier(lr=0.1))
    assert not a.fallback and a.topology is b.topology  # hyperparameters do not change the architecture
    assert (a.num_nodes, a.num_edges) == (8 + 16 + 3, 8 * 16 + 16 * 3)


def test_zoo_deepsets_pools_its_elements_and_permutes_its_hidden_units() -> None:
    TOPOLOGY_CACHE.clear()
    m = DeepSets(image_size=4, num_classes=3, hidden=5, phi_depth=2, rho_depth=1, in_channels=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        g = ParameterGraph.from_module(m)
    assert not g.fallback
    t = node_types(g)
    # inputs: the pixel value and its (row, col) coordinates; phi 5 + 5; BatchNorm 5; rho 5; head 3
    assert t == [NodeType.INPUT] * 3 + [NodeType.LINEAR] * 10 + [NodeType.BATCHNORM] * 5 + [NodeType.LINEAR] * 8
    # pooling over the set keeps the features: phi's last layer feeds the BatchNorm one-to-one
    assert g.num_edges == 3 * 5 + 5 * 5 + 5 + 5 * 5 + 5 * 3
    norm_edges = torch.tensor(edge_types(g)) == EdgeType.NORM
    src, dst = g.edge_index[:, norm_edges]
    assert src.tolist() == list(range(8, 13)) and dst.tolist() == list(range(13, 18))
    # hidden units permute: phi's first layer, phi's second tied to the BatchNorm, rho; inputs and logits stay
    plan = plan_for(m)
    assert plan is not None
    assert sorted(plan.sym.set_sizes[r] for r in plan.free) == [5, 5, 5]
    assert len(plan.free) == 3 and plan.root[2] == plan.root[3]
