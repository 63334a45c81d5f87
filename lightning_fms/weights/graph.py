"""Parameter graphs: a network's weights as a graph whose automorphisms are the network's neuron permutations.

Conventions (Lim et al. 2024, "Graph Metanetworks", with the changes listed here):

Nodes
    One node per neuron (``nn.Linear`` output unit) or channel (convolution output channel), per input feature of
    the network, and per output unit of every layer that creates a new activation: normalisation layers, residual
    additions, elementwise products of two activations, operations with a parameter tensor (positional embeddings,
    layer scales), embeddings, and the four neuron sets of every attention layer (queries, keys, values, output).
    Attention layers also get one node per head, and ``GroupNorm`` one node per group, so that the partition into
    heads/groups is encoded by structure (not by a label that permuting heads would change).

Edges (directed, input to output, in the order the layers run)
    * ``Linear``: one edge per weight entry ``W[j, i]``, from input neuron ``i`` to output neuron ``j``.
    * Convolution: one edge per (input channel, output channel) pair (only the pairs a grouped convolution
      connects), carrying the whole kernel as a vector (below). Transposed convolutions alike.
    * A ``Linear`` reading a flattened feature map (``C`` channels x ``k`` positions): one edge per (channel,
      output) pair carrying the ``k`` weights as a kernel vector.
    * Identity edges (value 1, -1 for a subtraction) from each operand neuron ``i`` to neuron ``i`` of a residual
      addition, a product, a normalisation or a parameter operation.
    * Attention: input -> query/key/value neurons (``in_proj``, one edge per entry); query ``i`` -> key ``i``
      (the pairing of the dot product); query and key neurons -> their head node; head node -> the head's value
      neurons; value -> output neurons (``out_proj``).
    * ``GroupNorm``: group node -> each channel of the group.

Edge values
    Every edge carries a kernel vector of ``Kh * Kw`` values (``max_kernel_size``, default 3x3): a convolution
    kernel padded symmetrically with zeros to the grid (1-d kernels lie in the middle row, higher-dimensional ones
    are folded to 2-d) and average-pooled down where it is larger; a scalar weight (``Linear``, identity edges)
    sits in the centre slot, so a ``Linear`` edge equals a 1x1-convolution edge.

Node values
    Biases, normalisation scale/shift and (``include_running_stats``) BatchNorm/InstanceNorm running mean and
    variance are node features of the layer's output nodes; embedding tables and broadcast parameter tensors
    (positional embeddings) give each of their nodes the statistics of its column (:data:`STAT_NAMES`).

Feature columns
    ``node_attr = [NODE_STATIC_FEATURES..., NODE_VALUE_FEATURES...]`` and
    ``edge_attr = [kernel values (Kh*Kw)..., EDGE_STATIC_FEATURES...]`` (integers stored as floats). Types are
    :class:`NodeType`/:class:`EdgeType`; ``depth`` is the number of weight layers on the longest path from the
    inputs and ``rel_depth`` that divided by the graph's maximum; ``io_pos`` is the index of network input/output
    neurons and -1 for hidden ones (hidden neurons carry no identity, so permuting them gives an isomorphic graph);
    ``part``/``head`` is the attention head or norm group (informative only: the GMN reads head membership from
    the head nodes, never this label, to stay invariant to permutations of heads).

Structure discovery
    The module is traced with ``torch.fx`` (leaf modules: those of ``torch.nn``) and the traced program is
    interpreted abstractly, following which neurons each value carries. Whatever cannot be traced, or uses an
    operation this interpreter does not model, gets the *statistics fallback*: one node per tensor (in state-dict
    order, chained by edges) carrying that tensor's statistics, with one ``warnings.warn`` per architecture.

Caching
    The topology (everything except the values) is built once per architecture and cached under a signature of
    the module's classes, ``torch.nn`` layer configuration and parameter/buffer names and shapes. A new checkpoint of
    a known architecture only re-reads values, with one vectorised pass per weight tensor.
"""

from __future__ import annotations

import hashlib
import math
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fms.weights._stats import NUM_STATS, STAT_NAMES, column_stats, tensor_stats


class NodeType(IntEnum):
    """Node types (column ``type`` of ``node_attr``)."""

    INPUT = 0
    LINEAR = 1
    CONV = 2
    BATCHNORM = 3
    LAYERNORM = 4
    GROUPNORM = 5
    INSTANCENORM = 6
    RMSNORM = 7
    ADD = 8
    MUL = 9
    PARAM_OP = 10
    EMBEDDING = 11
    ATTN_Q = 12
    ATTN_K = 13
    ATTN_V = 14
    ATTN_OUT = 15
    ATTN_HEAD = 16
    NORM_GROUP = 17
    TENSOR = 18  # statistics fallback: one node per tensor
    MERGE = 19  # concatenation of two activations along a non-feature dimension


class EdgeType(IntEnum):
    """Edge types (column ``type`` of the edge features)."""

    LINEAR = 0
    CONV = 1
    CONV_TRANSPOSE = 2
    FLAT_LINEAR = 3
    RESIDUAL = 4
    NORM = 5
    PARAM_OP = 6
    MUL = 7
    ATTN_Q = 8
    ATTN_K = 9
    ATTN_V = 10
    ATTN_OUT = 11
    ATTN_QK = 12
    HEAD_IN = 13
    HEAD_OUT = 14
    NORM_GROUP = 15
    SEQUENCE = 16  # statistics fallback: tensor i -> tensor i+1


NUM_NODE_TYPES = len(NodeType)
NUM_EDGE_TYPES = len(EdgeType)

#: Node feature columns that depend only on the architecture.
NODE_STATIC_FEATURES: tuple[str, ...] = (
    "type",
    "depth",
    "rel_depth",
    "io_pos",
    "part",
    "num_parts",
    "has_bias",
    "has_affine",
    "has_running",
    "has_stats",
    "log_numel",
)
#: Node feature columns read from the weights (zero where the flag above says absent).
NODE_VALUE_FEATURES: tuple[str, ...] = ("bias", "gamma", "beta", "running_mean", "running_var", *STAT_NAMES)
#: Edge feature columns after the kernel values.
EDGE_STATIC_FEATURES: tuple[str, ...] = (
    "type",
    "depth",
    "rel_depth",
    "head",
    "kernel_h",
    "kernel_w",
    "stride",
    "log_fan_in",
)
#: Per-edge-group features (an edge group is the edges one layer creates; ``head`` varies per edge and is apart).
GROUP_FEATURES: tuple[str, ...] = ("type", "depth", "rel_depth", "kernel_h", "kernel_w", "stride", "log_fan_in")

NS = {name: i for i, name in enumerate(NODE_STATIC_FEATURES)}
NV = {name: i for i, name in enumerate(NODE_VALUE_FEATURES)}
GF = {name: i for i, name in enumerate(GROUP_FEATURES)}
STAT_COLUMNS = slice(NV["q0"], NV["q0"] + NUM_STATS)


@dataclass(frozen=True)
class GraphOptions:
    """Options that change a parameter graph (and so are part of the topology cache key).

    Attributes:
        max_kernel_size: ``(Kh, Kw)`` grid every kernel vector is padded (or pooled) to.
        include_running_stats: Add BatchNorm/InstanceNorm running mean/variance as node features.
    """

    max_kernel_size: tuple[int, int] = (3, 3)
    include_running_stats: bool = True

    @property
    def kernel_numel(self) -> int:
        """``Kh * Kw``."""
        return self.max_kernel_size[0] * self.max_kernel_size[1]


# --------------------------------------------------------------------------------------------- value extraction


def kernel_to_grid(w: Tensor, grid: tuple[int, int]) -> Tensor:
    """Map kernels onto the fixed kernel grid.

    Args:
        w: Kernels, shape ``[N, *k]`` with 0 to 3 spatial dimensions (0: scalars).
        grid: ``(Kh, Kw)``.

    Returns:
        Shape ``[N, Kh * Kw]``: each kernel centred in the grid with zero padding (1-d kernels in the middle row,
        3-d kernels folded to ``(kd * kh, kw)``), average-pooled along any dimension larger than the grid.
    """
    n = w.shape[0]
    gh, gw = grid
    if w.dim() == 1:
        w = w.reshape(n, 1, 1)
    elif w.dim() == 2:
        w = w.reshape(n, 1, w.shape[1])
    elif w.dim() > 3:
        w = w.reshape(n, -1, w.shape[-1])
    kh, kw = w.shape[1], w.shape[2]
    if kh == gh and kw == gw:
        return w.reshape(n, gh * gw)
    ph, pw = max(gh - kh, 0), max(gw - kw, 0)
    if ph or pw:
        w = F.pad(w, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    if w.shape[1] > gh or w.shape[2] > gw:
        w = F.adaptive_avg_pool2d(w.unsqueeze(1), (gh, gw)).squeeze(1)
    return w.reshape(n, gh * gw)


def vector_to_grid(w: Tensor, numel: int) -> Tensor:
    """Map flat vectors (flattened spatial positions) onto ``numel`` slots.

    Args:
        w: Shape ``[N, k]``.
        numel: Number of slots ``Kh * Kw``.

    Returns:
        Shape ``[N, numel]``: centred with zero padding when ``k <= numel``, else average-pooled to ``numel``.
    """
    k = w.shape[1]
    if k == numel:
        return w
    if k < numel:
        pad = numel - k
        return F.pad(w, (pad // 2, pad - pad // 2))
    return F.adaptive_avg_pool1d(w.unsqueeze(1), numel).squeeze(1)


@dataclass(frozen=True)
class EdgeValueSpec:
    """How to read the values of one contiguous block of edges.

    Attributes:
        count: Number of edges in the block.
        name: Tensor name in the module's state, or ``None`` for constant edges.
        kind: ``"const"``, ``"kernel"`` (``W`` as ``[out, in_per_group, *k]``), ``"flat"`` (``W`` as
            ``[out, C * k]``) or ``"transpose"`` (``W`` stored ``[in, out / groups, *k]``: transposed
            convolutions and ``x @ W``).
        rows: Optional ``(start, stop)`` slice of the tensor's first dimension (attention ``in_proj``).
        groups: Convolution groups (``"transpose"`` only).
        flat_k: Positions per channel (``"flat"``), and ``flat_layout`` ``"major"`` (index ``c * k + r``) or
            ``"minor"`` (index ``r * C + c``).
        value: Constant edge value (``"const"``).
    """

    count: int
    name: str | None
    kind: str
    rows: tuple[int, int] | None = None
    groups: int = 1
    flat_k: int = 1
    flat_layout: str = "major"
    value: float = 1.0

    def read(self, tensors: Mapping[str, Tensor], grid: tuple[int, int], like: Tensor) -> Tensor:
        """Return the block's kernel vectors, shape ``[count, Kh * Kw]``."""
        numel = grid[0] * grid[1]
        if self.kind == "const":
            out = like.new_zeros(self.count, numel)
            out[:, (grid[0] // 2) * grid[1] + grid[1] // 2] = self.value
            return out
        assert self.name is not None
        w = tensors[self.name].detach()
        if self.rows is not None:
            w = w[self.rows[0] : self.rows[1]]
        if self.kind == "transpose":
            g = self.groups
            w = w.reshape(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2)
            w = w.reshape(w.shape[0] * w.shape[1], *w.shape[2:])
        if self.kind == "flat":
            out_f = w.shape[0]
            c = w.shape[1] // self.flat_k
            if self.flat_layout == "major":
                w = w.reshape(out_f * c, self.flat_k)
            else:
                w = w.reshape(out_f, self.flat_k, c).transpose(1, 2).reshape(out_f * c, self.flat_k)
            return vector_to_grid(w, numel)
        w = w.reshape(w.shape[0] * w.shape[1], *w.shape[2:])
        return kernel_to_grid(w, grid)


@dataclass(frozen=True)
class NodeValueSpec:
    """How to read node values from one tensor.

    Attributes:
        name: Tensor name.
        nodes: Node ids written, shape ``[n]``.
        kind: ``"vector"`` (the tensor, or its ``rows`` slice, holds one value per node, written to ``column``),
            ``"colstats"`` (per-node statistics of the tensor's slices along ``axis``, written to the statistics
            columns; a tensor without that axis gives every node the whole tensor's statistics) or ``"stats"``
            (one node gets the whole tensor's statistics).
        column: Index into :data:`NODE_VALUE_FEATURES` (``"vector"``).
        rows: Optional ``(start, stop)`` slice of the flattened tensor (``"vector"``).
        axis: Feature axis of the tensor (``"colstats"``), or ``None`` for whole-tensor statistics.
        scale: Multiplier applied to ``"vector"`` values (``-1`` for subtracted parameters).
    """

    name: str
    nodes: Tensor
    kind: str
    column: int = 0
    rows: tuple[int, int] | None = None
    axis: int | None = None
    scale: float = 1.0


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


# ---------------------------------------------------------------------------------------------- signatures/cache

_ARCH_ATTRS = ("num_heads", "batch_first", "norm_first", "kdim", "vdim", "add_zero_attn", "activation_relu_or_gelu")
_signature_memo: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def architecture_signature(module: nn.Module) -> str:
    """A hash of what determines a module's parameter-graph topology.

    It covers the classes of all submodules, the configuration of ``torch.nn`` layers (``extra_repr`` and attention
    settings) and the names and shapes of parameters and buffers. Data flow that depends on other attributes of
    user-written classes (e.g. a flag that skips a residual) is *not* covered: modules that differ only there must
    not share a signature, so give them different classes.

    Args:
        module: The module.

    Returns:
        A hex digest (memoised per module object).
    """
    memo = _signature_memo.get(module)
    if memo is not None:
        return memo
    parts: list[str] = []
    for name, m in module.named_modules(remove_duplicate=False):
        cls = type(m)
        entry = f"{name}:{cls.__module__}.{cls.__qualname__}"
        if cls.__module__.startswith("torch.nn"):
            entry += f"({m.extra_repr()})"
            entry += "".join(f";{a}={getattr(m, a)!r}" for a in _ARCH_ATTRS if hasattr(m, a))
            act = getattr(m, "activation", None)
            if act is not None:
                entry += f";act={getattr(act, '__name__', type(act).__name__)}"
        parts.append(entry)
    for name, t in module.named_parameters(remove_duplicate=False):
        parts.append(f"p:{name}:{tuple(t.shape)}")
    for name, t in module.named_buffers(remove_duplicate=False):
        parts.append(f"b:{name}:{tuple(t.shape)}")
    digest = hashlib.sha1("\n".join(parts).encode()).hexdigest()
    try:
        _signature_memo[module] = digest
    except TypeError:  # pragma: no cover - modules are weak-referenceable; be safe anyway
        pass
    return digest


def module_tensors(module: nn.Module) -> dict[str, Tensor]:
    """All parameters and buffers of a module by qualified name (shared tensors under every name), detached."""
    out = {name: p.detach() for name, p in module.named_parameters(remove_duplicate=False)}
    out.update({name: b.detach() for name, b in module.named_buffers(remove_duplicate=False)})
    return out


class TopologyCache:
    """An LRU cache of :class:`GraphTopology` by (architecture signature, options), with hit counters.

    Args:
        maxsize: Most architectures kept.
        max_bytes: Most bytes of topology tensors kept (a ResNet-18 topology holds about 80 MB).
    """

    def __init__(self, maxsize: int = 256, max_bytes: int = 2 << 30) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[str, GraphOptions], GraphTopology] = OrderedDict()
        self._warned: set[str] = set()
        self._lock = threading.RLock()

    def get(self, module: nn.Module, options: GraphOptions) -> GraphTopology:
        """Return the topology of ``module``'s architecture, building (and maybe warning) on a miss."""
        signature = architecture_signature(module)
        key = (signature, options)
        with self._lock:
            topo = self._items.get(key)
            if topo is not None:
                self.hits += 1
                self._items.move_to_end(key)
                return topo
            self.misses += 1
        from lightning_fms.weights._builder import build_topology

        topo = build_topology(module, options, signature)
        with self._lock:
            if topo.fallback and signature not in self._warned:
                self._warned.add(signature)
                warnings.warn(
                    f"lightning_fms.weights: {type(module).__qualname__} is embedded from per-tensor statistics "
                    f"only ({topo.fallback_reason})",
                    stacklevel=4,
                )
            if key not in self._items:
                self._items[key] = topo
                self._bytes += topo.nbytes
            while len(self._items) > 1 and (len(self._items) > self.maxsize or self._bytes > self.max_bytes):
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
        return topo

    def clear(self) -> None:
        """Forget all topologies, counters and warnings given."""
        with self._lock:
            self._items.clear()
            self._bytes = 0
            self._warned.clear()
            self.hits = 0
            self.misses = 0

    def __len__(self) -> int:
        return len(self._items)


#: The process-wide topology cache used by :meth:`ParameterGraph.from_module` and the featurizers.
TOPOLOGY_CACHE = TopologyCache()


# ------------------------------------------------------------------------------------------------ ParameterGraph


class ParameterGraph:
    """A module's weights as a graph (see the module docstring for the conventions).

    Attributes:
        topology: The cached, value-free part.
        node_values: Weight-derived node features :data:`NODE_VALUE_FEATURES`, shape ``[V, 12]``.
        edge_values: Kernel vectors, shape ``[E, Kh * Kw]``.
    """

    def __init__(self, topology: GraphTopology, node_values: Tensor, edge_values: Tensor) -> None:
        self.topology = topology
        self.node_values = node_values
        self.edge_values = edge_values

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        max_kernel_size: tuple[int, int] = (3, 3),
        include_running_stats: bool = True,
        cache: TopologyCache | None = None,
    ) -> ParameterGraph:
        """Build the graph of a module and its current weights.

        Args:
            module: Any ``nn.Module`` (untraceable ones get the statistics fallback with one warning).
            max_kernel_size: ``(Kh, Kw)`` of the kernel grid.
            include_running_stats: Include BatchNorm/InstanceNorm running statistics as node features.
            cache: Topology cache (default: the process-wide :data:`TOPOLOGY_CACHE`).

        Returns:
            The graph; its topology is shared with every other module of the same architecture.
        """
        options = GraphOptions(tuple(max_kernel_size), include_running_stats)  # type: ignore[arg-type]
        topology = (cache or TOPOLOGY_CACHE).get(module, options)
        node_values, edge_values = topology.extract(module_tensors(module))
        return cls(topology, node_values, edge_values)

    def refresh(self, module: nn.Module) -> None:
        """Re-read the values from ``module`` (which must have this graph's architecture)."""
        if architecture_signature(module) != self.topology.signature:
            raise ValueError("refresh() needs a module of the same architecture as the graph")
        self.node_values, self.edge_values = self.topology.extract(module_tensors(module))

    @property
    def num_nodes(self) -> int:
        """``V``."""
        return self.topology.num_nodes

    @property
    def num_edges(self) -> int:
        """``E``."""
        return self.topology.num_edges

    @property
    def fallback(self) -> bool:
        """Whether this is the statistics fallback graph."""
        return self.topology.fallback

    @property
    def edge_index(self) -> Tensor:
        """Shape ``[2, E]`` (long)."""
        return self.topology.edge_index

    @property
    def node_attr(self) -> Tensor:
        """Shape ``[V, 23]``: :data:`NODE_STATIC_FEATURES` then :data:`NODE_VALUE_FEATURES`."""
        static = self.topology.node_static.to(self.node_values.device, self.node_values.dtype)
        return torch.cat([static, self.node_values], 1)

    @property
    def edge_attr(self) -> Tensor:
        """Shape ``[E, Kh * Kw + 8]``: kernel values then :data:`EDGE_STATIC_FEATURES`."""
        topo = self.topology
        g = topo.group_attr.to(self.edge_values.device, self.edge_values.dtype)[topo.edge_group]
        head = topo.edge_head.to(self.edge_values.device, self.edge_values.dtype).unsqueeze(1)
        static = torch.cat([g[:, :3], head, g[:, 3:]], 1)
        return torch.cat([self.edge_values, static], 1)

    def to_data(self):  # noqa: ANN201 - torch_geometric.data.Data
        """The graph as a ``torch_geometric.data.Data`` (``x``, ``edge_index``, ``edge_attr``)."""
        from torch_geometric.data import Data

        return Data(x=self.node_attr, edge_index=self.edge_index, edge_attr=self.edge_attr, num_nodes=self.num_nodes)

    def __repr__(self) -> str:
        kind = ", fallback" if self.fallback else ""
        return f"ParameterGraph(nodes={self.num_nodes}, edges={self.num_edges}{kind})"


def log_numel(n: int) -> float:
    """``log(1 + n)``, the size feature of tensors."""
    return math.log1p(n)
