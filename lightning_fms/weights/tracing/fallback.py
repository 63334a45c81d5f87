"""The statistics fallback topology, for modules the interpreter cannot read: one node per tensor."""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_fms.weights.schema import GF, GROUP_FEATURES, NODE_STATIC_FEATURES, NS, EdgeType, GraphOptions, NodeType
from lightning_fms.weights.specs import EdgeValueSpec, NodeValueSpec
from lightning_fms.weights.topology import GraphTopology


def fallback_topology(module: nn.Module, options: GraphOptions, signature: str, reason: str) -> GraphTopology:
    """Build the statistics fallback topology.

    One node per tensor (parameters, plus floating buffers if running statistics are included), chained in state
    order by edges, each node carrying the tensor's statistics.
    """
    names = [n for n, _ in module.named_parameters()]
    if options.include_running_stats:
        names += [n for n, b in module.named_buffers() if b.is_floating_point()]
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    names = [n for n in names if tensors[n].numel() > 0]
    v = max(len(names), 1)
    static = torch.zeros(v, len(NODE_STATIC_FEATURES))
    static[:, NS["type"]] = float(NodeType.TENSOR)
    static[:, NS["depth"]] = torch.arange(v, dtype=torch.float32)
    static[:, NS["rel_depth"]] = torch.arange(v, dtype=torch.float32) / max(v - 1, 1)
    static[:, NS["io_pos"]] = -1.0
    static[:, NS["part"]] = -1.0
    static[:, NS["has_stats"]] = 1.0 if names else 0.0
    for i, n in enumerate(names):
        static[i, NS["log_numel"]] = math.log1p(tensors[n].numel())
    specs = [NodeValueSpec(n, torch.tensor([i]), "stats") for i, n in enumerate(names)]
    e = max(len(names) - 1, 0)
    edge_index = torch.stack([torch.arange(e), torch.arange(1, e + 1)]) if e else torch.zeros(2, 0, dtype=torch.long)
    group = [0.0] * len(GROUP_FEATURES)
    group[GF["type"]] = float(EdgeType.SEQUENCE)
    edge_specs = [EdgeValueSpec(e, None, "const")] if e else []
    return GraphTopology(
        signature=signature,
        options=options,
        num_nodes=v,
        edge_index=edge_index,
        edge_group=torch.zeros(e, dtype=torch.long),
        edge_head=torch.full((e,), -1, dtype=torch.long),
        group_attr=torch.tensor([group]) if e else torch.zeros(0, len(GROUP_FEATURES)),
        node_static=static,
        edge_specs=edge_specs,
        node_specs=specs,
        fallback=True,
        fallback_reason=reason,
    )
