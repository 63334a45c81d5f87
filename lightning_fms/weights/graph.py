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
    The interpreter is the package :mod:`lightning_fms.weights.tracing`.

Caching
    The topology (everything except the values) is built once per architecture and cached under a signature of
    the module's classes, ``torch.nn`` layer configuration and parameter/buffer names and shapes. A new checkpoint of
    a known architecture only re-reads values, with one vectorised pass per weight tensor.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
import weakref
from collections import OrderedDict

import torch
from torch import Tensor, nn

from lightning_fms.weights.schema import GraphOptions
from lightning_fms.weights.topology import GraphTopology, module_tensors
from lightning_fms.weights.tracing import build_topology

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
