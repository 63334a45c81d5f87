"""The handler tables of fx call_function / call_method / call_module nodes, through real traces."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fms.weights import TOPOLOGY_CACHE, ParameterGraph, permute_hidden_units
from lightning_fms.weights.tracing import build_topology
from lightning_fms.weights.tracing.functions import FUNCTION_HANDLERS
from lightning_fms.weights.tracing.methods import METHOD_HANDLERS
from lightning_fms.weights.tracing.modules import MODULE_HANDLERS
from lightning_fms.weights.tracing.ops import (
    BINARY_FUNCTIONS,
    BINARY_METHODS,
    CREATE_FUNCTIONS,
    REDUCE_FUNCTIONS,
    REDUCE_METHODS,
    UNARY_FUNCTIONS,
    UNARY_METHODS,
)


class Residual(nn.Module):
    """``h + relu(fc(h))`` written with the operator, ``torch.add`` or the method, per ``style``."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.inp = nn.Linear(3, 5)
        self.fc = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        r = torch.relu(self.fc(h))
        h = {"operator": lambda: h + r, "function": lambda: torch.add(h, r), "method": lambda: h.add(r)}[self.style]()
        return self.out(h)


class Calls(nn.Module):
    """One call ``op`` applied to a hidden activation."""

    def __init__(self, op) -> None:  # noqa: ANN001
        super().__init__()
        self.op = op
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.op(self.a(x)))


def drop_path(x: torch.Tensor) -> torch.Tensor:
    """Stands in for timm's stochastic depth (recognised by name)."""
    return x


def chunk_and_cat(h: torch.Tensor) -> torch.Tensor:
    a, b = torch.chunk(h, 2, dim=-1)
    return torch.cat([b, a], dim=-1)


def graph(module: nn.Module) -> ParameterGraph:
    TOPOLOGY_CACHE.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ParameterGraph.from_module(module)


def test_tables_cover_the_catalogue() -> None:
    for fn in (*BINARY_FUNCTIONS, *UNARY_FUNCTIONS, *REDUCE_FUNCTIONS, *CREATE_FUNCTIONS, operator.getitem, getattr):
        assert fn in FUNCTION_HANDLERS
    for name in (*BINARY_METHODS, *UNARY_METHODS, *REDUCE_METHODS, "view", "reshape", "permute", "split", "chunk"):
        assert name in METHOD_HANDLERS
    assert all(callable(k) for k in FUNCTION_HANDLERS) and all(isinstance(k, str) for k in METHOD_HANDLERS)


@pytest.mark.parametrize("style", ["function", "method"])
def test_operator_function_and_method_spellings_build_one_graph(style: str) -> None:
    reference = graph(Residual("operator"))
    other = graph(Residual(style))
    assert not reference.fallback and reference.num_nodes == 3 + 5 + 5 + 5 + 2  # inputs, inp, fc, the sum, out
    for name in ("edge_index", "edge_group", "group_attr", "node_static"):
        assert torch.equal(getattr(reference.topology, name), getattr(other.topology, name)), name


@pytest.mark.parametrize(
    "op,reason",
    [
        (lambda h: torch.cumsum(h, 1), "unsupported function cumsum"),
        (lambda h: h.cumsum(1), "unsupported method .cumsum()"),
        (lambda h: h**h, "power with an activation exponent"),
        (lambda h: h @ h.transpose(0, 1), "matrix product of activations"),
    ],
    ids=["function", "method", "power", "matmul"],
)
def test_calls_without_semantics_on_neurons_fall_back(op, reason: str) -> None:  # noqa: ANN001
    g = graph(Calls(op))
    assert g.fallback and g.topology.fallback_reason.startswith(reason)


@pytest.mark.parametrize(
    "op",
    [
        drop_path,  # by name
        lambda h: F.dropout(h, 0.1) * 2.0,
        lambda h: h.clamp(min=0).contiguous(),
        lambda h: h - h.mean(-1, keepdim=True),
        lambda h: h.reshape(h.size(0), -1),
        chunk_and_cat,
        lambda h: h + torch.zeros(1, 6).expand(h.shape[0], -1),  # varargs size with a traced entry
        lambda h: h + torch.zeros(h.shape[0], 6) + h.new_ones(h.size(0), 6),
        lambda h: h * torch.ones(1, 1, 6).repeat(h.shape[0], 1, 1).view(h.shape[0], 6),
    ],
    ids=["drop_path", "dropout", "methods", "centred", "reshape", "chunk-cat", "expand", "factories", "repeat-view"],
)
def test_calls_that_keep_the_neurons_trace(op) -> None:  # noqa: ANN001
    g = graph(Calls(op))
    assert not g.fallback
    assert g.num_edges >= 4 * 6 + 6 * 2  # both layers' weights are edges


class Buffers(nn.Module):
    """A constant grid (non-persistent buffer) expanded to the batch and concatenated to the input features, and a
    persistent buffer added to the hidden features."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("grid", torch.randn(2), persistent=False)
        self.register_buffer("offset", torch.randn(6))
        self.a = nn.Linear(4 + 2, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid.reshape(1, 2).expand(x.shape[0], -1)
        return self.b(self.a(torch.cat([x, grid], dim=-1)) + self.offset)


def test_buffers_are_traced_and_non_persistent_ones_are_constants() -> None:
    originals = [torch.Tensor.expand, torch.zeros]
    g = graph(Buffers())
    assert not g.fallback, g.topology.fallback_reason
    assert [torch.Tensor.expand, torch.zeros] == originals and "expand" not in vars(torch.Tensor)  # restored
    # the grid's 2 values per element are inputs of the first layer; the offset is a parameter operation on it
    assert g.num_nodes == (4 + 2) + 6 + 6 + 2
    read = {spec.name for spec in (*g.topology.node_specs, *g.topology.edge_specs)}
    assert "offset" in read and "grid" not in read


class ChannelOps(nn.Module):
    """Per-channel PReLU on a feature map, the channels split and concatenated back, max pooling with indices."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.act = nn.PReLU(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        h = torch.cat(torch.chunk(h, 2, dim=1), dim=1)  # the parts as one value
        h, _ = F.max_pool2d(h, 2, return_indices=True)
        return self.fc(h.mean((2, 3)))


def test_channel_prelu_split_parts_and_pooling_indices_trace() -> None:
    g = graph(ChannelOps())
    assert not g.fallback, g.topology.fallback_reason
    assert (g.num_nodes, g.num_edges) == (2 + 4 + 4 + 3, 2 * 4 + 4 + 4 * 3)


def test_channel_prelu_weights_move_with_their_channels() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.PReLU(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    m = m.double().eval()
    with torch.no_grad():
        m[1].weight.copy_(torch.rand(4))
    assert not graph(m).fallback
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    p = permute_hidden_units(m, torch.Generator().manual_seed(0))
    assert not torch.equal(p[1].weight, m[1].weight)
    assert torch.allclose(p(x), m(x), atol=1e-12)


def test_module_table_dispatches_subclasses_in_order() -> None:
    classes = [cls for cls, _ in MODULE_HANDLERS]
    assert classes.index(nn.TransformerEncoderLayer) < classes.index(nn.TransformerEncoder)
    # torch's own Linear subclass (attention's out_proj) is a linear layer
    proj = nn.modules.linear.NonDynamicallyQuantizableLinear(3, 4)
    topo = build_topology(proj, graph(nn.Linear(3, 4)).topology.options, "sig")
    assert not topo.fallback and (topo.num_nodes, topo.num_edges) == (3 + 4, 12)
    gru = build_topology(nn.GRU(3, 3), topo.options, "sig")
    assert gru.fallback and gru.fallback_reason == "unsupported layer GRU"
