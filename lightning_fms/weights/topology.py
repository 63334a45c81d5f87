"""The value-free part of a parameter graph (:class:`GraphTopology`), built once per architecture and cached.

A topology holds the graph structure, the static features, how to read values from a module's tensors
(:mod:`lightning_fms.weights.specs`) and the network's neuron permutations (:class:`SymmetryInfo`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_fms.weights._stats import column_stats, tensor_stats
from lightning_fms.weights.schema import NODE_VALUE_FEATURES, STAT_COLUMNS, GraphOptions
from lightning_fms.weights.specs import EdgeValueSpec, NodeValueSpec


@dataclass
class SymmetryInfo:
    """What the neuron permutations of the network are (used by :func:`permute_hidden_units`).

    Attributes:
        set_sizes: Size of every neuron set (a set is the nodes one operation creates, ids contiguous).
        set_starts: First node id of every set.
        set_types: :class:`NodeType` of every set.
        ties: ``(segments, set)``: the set's nodes are aligned one-to-one with the concatenated segments
            ``(set, lo, hi)`` (identity edges), so they must be permuted together.
        param_axes: ``(name, axis, segments, flat_layout, flat_k, rows)``: axis ``axis`` of tensor ``name``
            (restricted to ``rows = (axis, start, stop)`` of another axis, if given) is indexed by the concatenated
            segments, each node standing for ``flat_k`` entries laid out ``flat_layout``.
        frozen: Sets that must not be permuted (network inputs/outputs, grouped convolutions, norm groups, ...).
        attention: ``(q_set, k_set, v_set, num_heads)`` for every attention layer.
    """

    set_sizes: list[int] = field(default_factory=list)
    set_starts: list[int] = field(default_factory=list)
    set_types: list[int] = field(default_factory=list)
    ties: list[tuple[tuple[tuple[int, int, int], ...], int]] = field(default_factory=list)
    param_axes: list[
        tuple[str, int, tuple[tuple[int, int, int], ...], str | None, int, tuple[int, int, int] | None]
    ] = field(default_factory=list)
    frozen: set[int] = field(default_factory=set)
    attention: list[tuple[int, int, int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class LayerRecord:
    """One weight layer in data-flow order (used to recognise plain MLP/CNN chains).

    Attributes:
        kind: ``"linear"``, ``"conv"`` or another layer kind.
        weight: Weight tensor name, or ``None``.
        bias: Bias tensor name, or ``None``.
        in_segments: Segments ``(set, lo, hi)`` the layer reads.
        out_set: The set it creates.
        plain: Whether it is a plain layer for a neural functional (no groups, no transposition, no flattened
            spatial input).
    """

    kind: str
    weight: str | None
    bias: str | None
    in_segments: tuple[tuple[int, int, int], ...]
    out_set: int
    plain: bool = True


class GraphTopology:
    """Everything about a parameter graph that does not depend on the weight values (cached per architecture).

    Attributes:
        signature: The architecture signature it was built for.
        options: The :class:`GraphOptions` it was built with.
        num_nodes: ``V``.
        num_edges: ``E``.
        edge_index: Source and destination node of every edge, shape ``[2, E]`` (long).
        edge_group: Edge group of every edge, shape ``[E]`` (long).
        edge_head: Attention head of every edge (-1 if none), shape ``[E]`` (long).
        group_attr: Per-group features :data:`GROUP_FEATURES`, shape ``[G, 7]``.
        node_static: Static node features :data:`NODE_STATIC_FEATURES`, shape ``[V, 11]``.
        edge_specs: How to read each contiguous block of edge values, in edge order.
        node_specs: How to read node values.
        fallback: Whether this is the statistics fallback graph.
        fallback_reason: Why the fallback was used.
        symmetry: The network's neuron permutations (``None`` for the fallback).
        layers: Weight layers in data-flow order.
        tensor_names: Names of all the tensors the graph reads.
        unused_tensors: Parameters the traced forward never reached (not represented).
        dense_groups: Edge groups that are complete (grouped) bipartite blocks: group id ->
            ``(groups, out_per_group, in_per_group, in_nodes [groups * in], out_nodes [groups * out])``, edges
            ordered ``(group, out, in)``.
        group_ptr: Edge range of every group (groups are contiguous), shape ``[G + 1]`` (long).
    """

    def __init__(
        self,
        *,
        signature: str,
        options: GraphOptions,
        num_nodes: int,
        edge_index: Tensor,
        edge_group: Tensor,
        edge_head: Tensor,
        group_attr: Tensor,
        node_static: Tensor,
        edge_specs: list[EdgeValueSpec],
        node_specs: list[NodeValueSpec],
        fallback: bool = False,
        fallback_reason: str | None = None,
        symmetry: SymmetryInfo | None = None,
        layers: list[LayerRecord] | None = None,
        unused_tensors: tuple[str, ...] = (),
        dense_groups: dict[int, tuple[int, int, int, Tensor, Tensor]] | None = None,
    ) -> None:
        self.signature = signature
        self.options = options
        self.num_nodes = int(num_nodes)
        self.num_edges = int(edge_index.shape[1])
        self.edge_index = edge_index
        self.edge_group = edge_group
        self.edge_head = edge_head
        self.group_attr = group_attr
        self.node_static = node_static
        self.edge_specs = edge_specs
        self.node_specs = node_specs
        self.fallback = fallback
        self.fallback_reason = fallback_reason
        self.symmetry = symmetry
        self.layers = layers or []
        names: dict[str, None] = {}
        for s in edge_specs:
            if s.name is not None:
                names[s.name] = None
        for s in node_specs:
            names[s.name] = None
        self.tensor_names = tuple(names)
        self.unused_tensors = unused_tensors
        self.dense_groups = dense_groups or {}
        counts = torch.bincount(edge_group, minlength=self.num_groups) if self.num_edges else torch.zeros(0)
        self.group_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.long().cumsum(0)])
        assert sum(s.count for s in edge_specs) == self.num_edges
        self._derived: dict[str, Tensor] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held by the topology's tensors."""
        tensors = [self.edge_index, self.edge_group, self.edge_head, self.group_attr, self.node_static, self.group_ptr]
        tensors += [s.nodes for s in self.node_specs]
        tensors += [t for d in self.dense_groups.values() for t in d[3:]]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def num_groups(self) -> int:
        """``G``, the number of edge groups."""
        return int(self.group_attr.shape[0])

    def extract(self, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Read node and edge values from a module's tensors.

        Args:
            tensors: Name -> tensor (parameters and buffers of a module of this architecture).

        Returns:
            ``(node_values [V, 12], edge_values [E, Kh * Kw])``, detached, in the tensors' floating dtype and device.
        """
        like = _floating_like(tensors, self.tensor_names)
        grid = self.options.max_kernel_size
        chunks = [spec.read(tensors, grid, like) for spec in self.edge_specs]
        numel = self.options.kernel_numel
        if chunks:
            edge_values = torch.cat([c.to(like.dtype) for c in chunks], 0)
        else:
            edge_values = like.new_zeros(0, numel)
        node_values = like.new_zeros(self.num_nodes, len(NODE_VALUE_FEATURES))
        for spec in self.node_specs:
            t = tensors[spec.name].detach().to(like.dtype)
            nodes = spec.nodes.to(like.device)
            if spec.kind == "vector":
                v = t.reshape(-1)
                if spec.rows is not None:
                    v = v[spec.rows[0] : spec.rows[1]]
                node_values[nodes, spec.column] = v * spec.scale if spec.scale != 1.0 else v
            elif spec.kind == "stats":
                node_values[nodes, STAT_COLUMNS] = tensor_stats(t) if t.numel() else 0.0
            else:  # colstats
                if spec.axis is None or t.dim() == 0 or t.shape[spec.axis] != nodes.numel():
                    node_values[nodes, STAT_COLUMNS] = tensor_stats(t)
                else:
                    cols = t.movedim(spec.axis, -1).reshape(-1, nodes.numel())
                    node_values[nodes, STAT_COLUMNS] = column_stats(cols)
        return node_values, edge_values

    def derived(self, name: str, fn) -> Tensor:  # noqa: ANN001 - small internal memo
        """Memoise a tensor derived from the topology (aggregation orders, degrees, ...)."""
        with self._lock:
            if name not in self._derived:
                self._derived[name] = fn()
            return self._derived[name]

    def __repr__(self) -> str:
        kind = "fallback" if self.fallback else "traced"
        return f"GraphTopology({kind}, nodes={self.num_nodes}, edges={self.num_edges}, groups={self.num_groups})"


def _floating_like(tensors: Mapping[str, Tensor], names: tuple[str, ...]) -> Tensor:
    """A tensor with the dtype (at least float32) and device values are read in."""
    found = None
    for name in names:
        t = tensors.get(name)
        if t is not None and t.is_floating_point():
            found = t
            break
    if found is None:
        found = next((t for t in tensors.values() if t.is_floating_point()), torch.zeros(()))
    if found.element_size() < 4:
        return torch.zeros((), dtype=torch.float32, device=found.device)
    return found.detach()


def module_tensors(module: nn.Module) -> dict[str, Tensor]:
    """All parameters and buffers of a module by qualified name (shared tensors under every name), detached."""
    out = {name: p.detach() for name, p in module.named_parameters(remove_duplicate=False)}
    out.update({name: b.detach() for name, b in module.named_buffers(remove_duplicate=False)})
    return out
