"""Batching parameter graphs by index offsets (a disjoint union), with everything static precomputed once.

Edges are reordered inside a batch: for every run of consecutive graphs of one architecture, each large complete
bipartite edge group (a ``Linear``/convolution/attention projection) of all the run's graphs becomes one contiguous
*dense block* of shape ``[blocks, out, in]``; the remaining edges follow, in their original order. Dense blocks are
processed with broadcasts and reshaped sums instead of gathers and scatters (the same function, much cheaper on a
CPU); the remainder with ``torch_geometric.utils.scatter``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from lightning_fms.weights.topology import GraphTopology

#: Merged edge groups with at least this many edges become dense blocks.
DENSE_MIN_EDGES = 1024


@dataclass(frozen=True)
class DenseBlock:
    """A contiguous range of edges forming ``blocks`` complete bipartite blocks (edges ordered ``(block, out, in)``).

    Attributes:
        start: First edge.
        count: Number of edges, ``blocks * out * inn``.
        group: Edge group whose static features all its edges share.
        blocks: Number of bipartite blocks (convolution groups x graphs).
        out: Output nodes per block.
        inn: Input nodes per block.
        in_nodes: Input node ids, shape ``[blocks * inn]`` (long).
        out_nodes: Output node ids, shape ``[blocks * out]`` (long).
        first_graph: The graphs ``first_graph .. first_graph + num_graphs - 1`` own consecutive equal shares.
        num_graphs: Number of graphs sharing the block.
    """

    start: int
    count: int
    group: int
    blocks: int
    out: int
    inn: int
    in_nodes: Tensor
    out_nodes: Tensor
    first_graph: int
    num_graphs: int


@dataclass(frozen=True)
class StaticBatch:
    """The value-free part of a batch of graphs (depends only on the sequence of architectures).

    Attributes:
        num_graphs: ``B``.
        num_nodes: ``V`` (all graphs).
        num_edges: ``E`` (all graphs).
        edge_index: Shape ``[2, E]`` (long), node ids offset per graph, edges in batch order.
        edge_group: Shape ``[E]`` (long), group ids offset per graph.
        edge_batch: Graph of every edge, shape ``[E]`` (long).
        edge_perm: Batch edge order as indices into the graphs' concatenated edges, shape ``[E]``, or ``None``
            when unchanged (apply it to the concatenated edge values).
        group_attr: Shape ``[G, 7]``.
        node_static: Shape ``[V, 11]``.
        node_ptr: Node range of every graph, shape ``[B + 1]`` (long).
        inv_in_deg: ``1 / max(in-degree, 1)``, shape ``[V, 1]``.
        inv_out_deg: ``1 / max(out-degree, 1)``, shape ``[V, 1]``.
        inv_nodes: ``1 / max(nodes per graph, 1)``, shape ``[B, 1]``.
        inv_edges: ``1 / max(edges per graph, 1)``, shape ``[B, 1]``.
        dense: The dense blocks, in edge order, covering edges ``0 .. rest_start - 1``.
        rest_start: First edge of the remainder (edges ``rest_start .. E - 1``).
    """

    num_graphs: int
    num_nodes: int
    num_edges: int
    edge_index: Tensor
    edge_group: Tensor
    edge_batch: Tensor
    edge_perm: Tensor | None
    group_attr: Tensor
    node_static: Tensor
    node_ptr: Tensor
    inv_in_deg: Tensor
    inv_out_deg: Tensor
    inv_nodes: Tensor
    inv_edges: Tensor
    dense: tuple[DenseBlock, ...]
    rest_start: int

    def to(self, device: torch.device, dtype: torch.dtype) -> StaticBatch:
        """Move to ``device``; floating tensors take ``dtype``."""
        changes: dict[str, object] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                changes[f.name] = v.to(device, dtype) if v.is_floating_point() else v.to(device)
        changes["dense"] = tuple(
            replace(d, in_nodes=d.in_nodes.to(device), out_nodes=d.out_nodes.to(device)) for d in self.dense
        )
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def nbytes(self) -> int:
        """Bytes held by the batch's tensors."""
        tensors = [getattr(self, f.name) for f in fields(self)]
        tensors = [t for t in tensors if isinstance(t, Tensor)]
        tensors += [t for d in self.dense for t in (d.in_nodes, d.out_nodes)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _degree_inv(index: Tensor, n: int) -> Tensor:
    deg = torch.bincount(index, minlength=n).clamp_min(1).float()
    return (1.0 / deg).unsqueeze(1)


def static_batch(topologies: Sequence[GraphTopology]) -> StaticBatch:
    """Build the disjoint union of the given topologies (graphs in order; edges in batch order)."""
    b = len(topologies)
    node_counts = torch.tensor([t.num_nodes for t in topologies], dtype=torch.long)
    edge_counts = torch.tensor([t.num_edges for t in topologies], dtype=torch.long)
    group_counts = torch.tensor([t.num_groups for t in topologies], dtype=torch.long)
    zero = torch.zeros(1, dtype=torch.long)
    node_ptr = torch.cat([zero, node_counts.cumsum(0)])
    edge_ptr = torch.cat([zero, edge_counts.cumsum(0)])
    group_off = torch.cat([zero, group_counts.cumsum(0)])
    if len(set(map(id, topologies))) == 1 and b > 1:
        t = topologies[0]
        edge_index = (t.edge_index.unsqueeze(1) + node_ptr[:-1].view(1, b, 1)).reshape(2, -1)
        edge_group = (t.edge_group.unsqueeze(0) + group_off[:-1].view(b, 1)).reshape(-1)
        group_attr = t.group_attr.repeat(b, 1)
        node_static = t.node_static.repeat(b, 1)
    else:
        edge_index = torch.cat([t.edge_index + node_ptr[i] for i, t in enumerate(topologies)], 1)
        edge_group = torch.cat([t.edge_group + group_off[i] for i, t in enumerate(topologies)])
        group_attr = torch.cat([t.group_attr for t in topologies])
        node_static = torch.cat([t.node_static for t in topologies])
    v, e = int(node_ptr[-1]), int(edge_ptr[-1])
    edge_batch = torch.repeat_interleave(torch.arange(b), edge_counts)

    # runs of consecutive graphs with the same topology; merge their dense groups
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(topologies):
        if runs and topologies[runs[-1][0]] is t:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    order: list[Tensor] = []
    dense: list[DenseBlock] = []
    covered = torch.zeros(e, dtype=torch.bool)
    pos = 0
    for first, r in runs:
        t = topologies[first]
        for gid, (groups, og, ig, in_nodes, out_nodes) in t.dense_groups.items():
            n = groups * og * ig
            if n * r < DENSE_MIN_EDGES:
                continue
            starts = edge_ptr[first : first + r] + t.group_ptr[gid]
            idx = (starts.unsqueeze(1) + torch.arange(n)).reshape(-1)
            order.append(idx)
            covered[idx] = True
            offs = node_ptr[first : first + r].unsqueeze(1)
            dense.append(
                DenseBlock(
                    start=pos,
                    count=n * r,
                    group=gid + int(group_off[first]),
                    blocks=groups * r,
                    out=og,
                    inn=ig,
                    in_nodes=(in_nodes.unsqueeze(0) + offs).reshape(-1),
                    out_nodes=(out_nodes.unsqueeze(0) + offs).reshape(-1),
                    first_graph=first,
                    num_graphs=r,
                )
            )
            pos += n * r
    rest_start = pos
    if dense:
        order.append((~covered).nonzero().squeeze(1))
        perm: Tensor | None = torch.cat(order)
        if torch.equal(perm, torch.arange(e)):
            perm = None
    else:
        perm = None
    if perm is not None:
        edge_index = edge_index[:, perm]
        edge_group = edge_group[perm]
        edge_batch = edge_batch[perm]
    return StaticBatch(
        num_graphs=b,
        num_nodes=v,
        num_edges=e,
        edge_index=edge_index,
        edge_group=edge_group,
        edge_batch=edge_batch,
        edge_perm=perm,
        group_attr=group_attr,
        node_static=node_static,
        node_ptr=node_ptr,
        inv_in_deg=_degree_inv(edge_index[1], v),
        inv_out_deg=_degree_inv(edge_index[0], v),
        inv_nodes=(1.0 / node_counts.clamp_min(1).float()).unsqueeze(1),
        inv_edges=(1.0 / edge_counts.clamp_min(1).float()).unsqueeze(1),
        dense=tuple(dense),
        rest_start=rest_start,
    )
