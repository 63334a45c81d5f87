"""Graph emission: the state a trace builds (neuron sets, edge groups, value specs, symmetries) and its primitives.

Layer semantics (:mod:`~lightning_fms.weights.tracing.layers`, :mod:`~lightning_fms.weights.tracing.elementwise`)
call these primitives; :meth:`GraphEmitter.topology` assembles the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fms.weights.schema import (
    GF,
    GROUP_FEATURES,
    NODE_STATIC_FEATURES,
    NS,
    NV,
    EdgeType,
    GraphOptions,
    NodeType,
)
from lightning_fms.weights.specs import EdgeValueSpec, NodeValueSpec
from lightning_fms.weights.topology import GraphTopology, LayerRecord, SymmetryInfo, module_tensors
from lightning_fms.weights.tracing.values import Activation, LazyInput, Segment, Unsupported


@dataclass
class NeuronSet:
    """The nodes one operation creates (ids ``start:start + size``), of one type and depth."""

    start: int
    size: int
    type: int
    depth: int


class GraphEmitter:
    """The graph a trace emits, node set by node set and edge group by edge group.

    Args:
        root: The module being traced.
        options: The graph options (running statistics, kernel grid).

    Attributes:
        tensors: The module's parameters and buffers by qualified name.
        constants: Names of its non-persistent buffers: not part of its state, they carry no values to read
            (coordinate grids, masks) and are traced as constants.
        sets: Every neuron set, in creation order.
        sym: The neuron permutations found so far.
        layers: Weight layers in data-flow order.
        used: Names of the tensors read so far.
    """

    def __init__(self, root: nn.Module, options: GraphOptions) -> None:
        self.root = root
        self.options = options
        self.tensors = module_tensors(root)
        self.constants = set(self.tensors) - set(root.state_dict(keep_vars=True))
        self.sets: list[NeuronSet] = []
        self.num_nodes = 0
        self.node_chunks: list[Tensor] = []
        self.io_updates: list[tuple[Tensor, Tensor]] = []
        self.src: list[Tensor] = []
        self.dst: list[Tensor] = []
        self.gid: list[Tensor] = []
        self.heads: list[Tensor] = []
        self.edge_specs: list[EdgeValueSpec] = []
        self.groups: list[list[float]] = []
        self.node_specs: list[NodeValueSpec] = []
        self.sym = SymmetryInfo()
        self.layers: list[LayerRecord] = []
        self.used: set[str] = set()
        self.lazy_map: dict[int, Activation] = {}
        self.dense: dict[int, tuple[int, int, int, Tensor, Tensor]] = {}

    def new_set(
        self,
        size: int,
        ntype: NodeType,
        depth: int,
        *,
        part: Tensor | None = None,
        num_parts: int = 0,
        has_bias: bool = False,
        has_affine: bool = False,
        has_running: bool = False,
        has_stats: bool = False,
        log_numel: float = 0.0,
        io: bool = False,
    ) -> int:
        """Create a neuron set of ``size`` nodes with their static features.

        Args:
            size: Number of nodes.
            ntype: Their node type.
            depth: Weight layers on the longest path from the inputs.
            part: Head or group of every node, shape ``[size]`` (informative only).
            num_parts: Number of heads or groups.
            has_bias: Static flag ``has_bias``.
            has_affine: Static flag ``has_affine``.
            has_running: Static flag ``has_running``.
            has_stats: Static flag ``has_stats``.
            log_numel: ``log(1 + numel)`` of the tensor whose statistics the nodes carry.
            io: Network input or output nodes (``io_pos`` is their index; -1 otherwise).

        Returns:
            The set id.
        """
        if size <= 0:
            raise Unsupported(f"empty neuron set ({ntype.name})")
        rows = torch.zeros(size, len(NODE_STATIC_FEATURES))
        rows[:, NS["type"]] = float(ntype)
        rows[:, NS["depth"]] = float(depth)
        rows[:, NS["io_pos"]] = torch.arange(size, dtype=torch.float32) if io else -1.0
        rows[:, NS["part"]] = part.float() if part is not None else -1.0
        rows[:, NS["num_parts"]] = float(num_parts)
        rows[:, NS["has_bias"]] = float(has_bias)
        rows[:, NS["has_affine"]] = float(has_affine)
        rows[:, NS["has_running"]] = float(has_running)
        rows[:, NS["has_stats"]] = float(has_stats)
        rows[:, NS["log_numel"]] = float(log_numel)
        self.node_chunks.append(rows)
        sid = len(self.sets)
        self.sets.append(NeuronSet(self.num_nodes, size, int(ntype), depth))
        self.num_nodes += size
        return sid

    def nodes(self, segs: Sequence[Segment]) -> Tensor:
        """Node ids of the concatenated segments, shape ``[n]`` (long)."""
        parts = [torch.arange(self.sets[s].start + lo, self.sets[s].start + hi) for s, lo, hi in segs]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def set_nodes(self, sid: int) -> Tensor:
        """Node ids of set ``sid``, shape ``[size]`` (long)."""
        info = self.sets[sid]
        return torch.arange(info.start, info.start + info.size)

    def depth(self, *acts: Activation) -> int:
        """The largest depth of the sets the activations read."""
        return max((self.sets[s].depth for a in acts for s, _, _ in a.segs), default=0)

    def add_edges(
        self,
        src: Tensor,
        dst: Tensor,
        spec: EdgeValueSpec,
        etype: EdgeType,
        depth: int,
        *,
        kernel: tuple[int, int] = (1, 1),
        stride: int = 1,
        fan_in: int = 1,
        head: Tensor | None = None,
        dense: tuple[int, int, int, Tensor, Tensor] | None = None,
    ) -> None:
        """Add one edge group (the edges one layer creates) and how to read its values.

        Args:
            src: Source node of every edge, shape ``[n]``.
            dst: Destination node of every edge, shape ``[n]``.
            spec: How to read the ``n`` edge values.
            etype: The edge type.
            depth: The group's depth.
            kernel: ``(kernel_h, kernel_w)`` group features.
            stride: The convolution stride.
            fan_in: Inputs per output (``log_fan_in`` feature).
            head: Attention head of every edge, shape ``[n]`` (default -1).
            dense: ``(groups, out_per_group, in_per_group, in_nodes, out_nodes)`` if the group is a complete bipartite
                block with edges ordered ``(group, out, in)``.
        """
        assert src.numel() == dst.numel() == spec.count
        gid = len(self.groups)
        if dense is not None:
            self.dense[gid] = dense
        row = [0.0] * len(GROUP_FEATURES)
        row[GF["type"]] = float(etype)
        row[GF["depth"]] = float(depth)
        row[GF["kernel_h"]] = float(kernel[0])
        row[GF["kernel_w"]] = float(kernel[1])
        row[GF["stride"]] = float(stride)
        row[GF["log_fan_in"]] = math.log(max(fan_in, 1))
        self.groups.append(row)
        self.src.append(src)
        self.dst.append(dst)
        self.gid.append(torch.full((src.numel(),), gid, dtype=torch.long))
        self.heads.append(head if head is not None else torch.full((src.numel(),), -1, dtype=torch.long))
        self.edge_specs.append(spec)
        if spec.name is not None:
            self.used.add(spec.name)

    def identity_edges(self, a: Activation, sid: int, etype: EdgeType, value: float = 1.0) -> None:
        """Connect the neurons of ``a`` one-to-one to set ``sid`` with constant edges (and tie them)."""
        src = self.nodes(a.segs)
        self.add_edges(
            src,
            self.set_nodes(sid),
            EdgeValueSpec(src.numel(), None, "const", value=value),
            etype,
            self.sets[sid].depth,
        )
        self.sym.ties.append((a.segs, sid))

    def node_vector(self, name: str | None, sid: int, column: str, *, rows: tuple[int, int] | None = None) -> None:
        """Read tensor ``name`` (or its ``rows`` slice) as one value per node of set ``sid`` into ``column``.

        Nothing happens when ``name`` is ``None`` (the layer has no such tensor).
        """
        if name is None:
            return
        t = self.tensors[name]
        n = (rows[1] - rows[0]) if rows is not None else t.numel()
        if n != self.sets[sid].size:
            raise Unsupported(f"{name} has {n} values for {self.sets[sid].size} neurons")
        self.node_specs.append(NodeValueSpec(name, self.set_nodes(sid), "vector", column=NV[column], rows=rows))
        self.used.add(name)
        if rows is None:
            self.sym.param_axes.append((name, 0, ((sid, 0, self.sets[sid].size),), None, 1, None))

    def tensor(self, name: str) -> Tensor:
        """The module's tensor ``name``; :class:`Unsupported` if unknown or uninitialised (lazy modules)."""
        t = self.tensors.get(name)
        if t is None:
            raise Unsupported(f"unknown tensor {name}")
        if isinstance(t, nn.parameter.UninitializedParameter):
            raise Unsupported(f"{name} is uninitialised (lazy module)")
        return t

    def act(self, v: Any, size: int, fdim: int, rank: int | None) -> Activation:
        """Return ``v`` as an activation, creating input nodes for a not-yet-sized network input."""
        if isinstance(v, Activation):
            return v
        if isinstance(v, LazyInput):
            got = self.lazy_map.get(id(v))
            if got is not None:
                if got.size != size:
                    raise Unsupported(f"input {v.name} read with sizes {got.size} and {size}")
                return got
            sid = self.new_set(size, NodeType.INPUT, 0, io=True)
            self.sym.frozen.add(sid)
            got = Activation(((sid, 0, size),), fdim, rank)
            self.lazy_map[id(v)] = got
            return got
        raise Unsupported(f"a layer reads {v!r}, which carries no neurons")

    def topology(self, signature: str) -> GraphTopology:
        """Assemble the :class:`GraphTopology` from everything emitted.

        Args:
            signature: The architecture signature.

        Returns:
            The topology.
        """
        if not self.sets:
            raise Unsupported("no layers found")
        node_static = torch.cat(self.node_chunks, 0)
        for nodes, values in self.io_updates:
            node_static[nodes, NS["io_pos"]] = values
        max_depth = max(max(s.depth for s in self.sets), 1)
        node_static[:, NS["rel_depth"]] = node_static[:, NS["depth"]] / max_depth
        if self.src:
            edge_index = torch.stack([torch.cat(self.src), torch.cat(self.dst)])
            edge_group = torch.cat(self.gid)
            edge_head = torch.cat(self.heads)
            group_attr = torch.tensor(self.groups, dtype=torch.float32)
            group_attr[:, GF["rel_depth"]] = group_attr[:, GF["depth"]] / max_depth
        else:
            edge_index = torch.zeros(2, 0, dtype=torch.long)
            edge_group = torch.zeros(0, dtype=torch.long)
            edge_head = torch.zeros(0, dtype=torch.long)
            group_attr = torch.zeros(0, len(GROUP_FEATURES))
        sym = self.sym
        sym.set_sizes = [s.size for s in self.sets]
        sym.set_starts = [s.start for s in self.sets]
        sym.set_types = [s.type for s in self.sets]
        params = [n for n, _ in self.root.named_parameters()]
        unused = tuple(n for n in params if n not in self.used)
        return GraphTopology(
            signature=signature,
            options=self.options,
            num_nodes=self.num_nodes,
            edge_index=edge_index,
            edge_group=edge_group,
            edge_head=edge_head,
            group_attr=group_attr,
            node_static=node_static,
            edge_specs=self.edge_specs,
            node_specs=self.node_specs,
            symmetry=sym,
            layers=self.layers,
            unused_tensors=unused,
            dense_groups=self.dense,
        )
