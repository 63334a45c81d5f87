"""ParameterGraph: feature layout, values, the topology cache (one build and one warning per architecture)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_fms.testing.networks import DataDependentNet, TinyResidualNet, tiny_mlp
from lightning_fms.weights import (
    EDGE_STATIC_FEATURES,
    NODE_STATIC_FEATURES,
    NODE_VALUE_FEATURES,
    TOPOLOGY_CACHE,
    EdgeType,
    ParameterGraph,
)

K = 9  # default 3x3 kernel grid
CENTRE = 4
NT = NODE_STATIC_FEATURES.index("type")
ET = K + EDGE_STATIC_FEATURES.index("type")


def edge_types(g: ParameterGraph) -> list[int]:
    return g.edge_attr[:, ET].long().tolist()


def test_mlp_counts_and_values() -> None:
    m = tiny_mlp((3, 4, 2))
    g = ParameterGraph.from_module(m)
    # nodes: 3 inputs + 4 hidden + 2 outputs; edges: 3*4 + 4*2 weights
    assert (g.num_nodes, g.num_edges) == (9, 20)
    assert g.edge_index.shape == (2, 20)
    assert g.node_attr.shape == (9, len(NODE_STATIC_FEATURES) + len(NODE_VALUE_FEATURES))
    assert g.edge_attr.shape == (20, K + len(EDGE_STATIC_FEATURES))
    w = m[0].weight.detach()
    for e in range(12):
        i, j = g.edge_index[:, e].tolist()
        assert g.edge_attr[e, CENTRE] == w[j - 3, i]  # W[out, in] on edge in -> out, centre slot
        assert g.edge_attr[e, :K].count_nonzero() <= 1
    io = g.node_attr[:, NODE_STATIC_FEATURES.index("io_pos")]
    assert io.tolist() == [0, 1, 2, -1, -1, -1, -1, 0, 1]  # hidden neurons carry no identity
    bias = g.node_attr[:, len(NODE_STATIC_FEATURES) + NODE_VALUE_FEATURES.index("bias")]
    assert torch.equal(bias[3:7], m[0].bias.detach())
    assert set(edge_types(g)) == {EdgeType.LINEAR}


def test_untraceable_module_falls_back_with_one_warning() -> None:
    TOPOLOGY_CACHE.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = ParameterGraph.from_module(DataDependentNet())
        g2 = ParameterGraph.from_module(DataDependentNet())
    assert g.fallback and g2.fallback
    assert len(caught) == 1 and "statistics" in str(caught[0].message)
    assert g.num_nodes == 4  # one node per tensor, chained
    assert g.num_edges == 3
    assert g.topology.fallback_reason and "control flow" in g.topology.fallback_reason


def test_topology_cache_hit_for_second_checkpoint() -> None:
    TOPOLOGY_CACHE.clear()
    a, b = TinyResidualNet(), TinyResidualNet()
    ga = ParameterGraph.from_module(a)
    gb = ParameterGraph.from_module(b)
    assert TOPOLOGY_CACHE.misses == 1 and TOPOLOGY_CACHE.hits == 1
    assert ga.topology is gb.topology
    assert not torch.equal(ga.edge_values, gb.edge_values)
    before = gb.edge_values.clone()
    with torch.no_grad():
        b.stem.weight.mul_(2)
    gb.refresh(b)
    assert TOPOLOGY_CACHE.misses == 1
    assert torch.allclose(gb.edge_values[:12], 2 * before[:12])  # the stem's 3*4 channel pairs come first
    assert torch.equal(gb.edge_values[12:], before[12:])


@pytest.mark.parametrize("shape", [(2, 3), (1, 4)])
def test_to_data(shape: tuple[int, int]) -> None:
    g = ParameterGraph.from_module(tiny_mlp(shape))
    data = g.to_data()
    assert data.num_nodes == g.num_nodes and data.edge_attr.shape[0] == g.num_edges
