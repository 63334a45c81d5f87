"""Graph metanetwork (GMN) featurizer: an edge-and-node message-passing network on parameter graphs.

Architecture (defaults: hidden ``h = 32``, 4 blocks, output 32):

* **Node encoder**: ``Embedding(node type) + sin(Linear(depth, rel_depth)) + [io] sin(Linear(io_pos)) +
  Linear(flags, log #parts, log numel, symlog(node values))``. The head/group label is *not* read (head membership
  comes from the head nodes), so permuting attention heads or norm groups gives the same embedding.
* **Edge encoder**: ``Embedding(edge type) + sin(Linear(depth, rel_depth, kernel size, stride, log fan-in))``
  computed once per edge group, plus ``Linear(kernel values * sqrt(fan_in))`` per edge (the fan-in scaling maps
  default-initialised weights to O(1) values).
* **Blocks** (pre-LayerNorm, residual on nodes and edges)::

      x^, e^ = LN(x), LN(e)
      m      = ReLU(e^ + A x^[src] + B x^[dst])            # edge update, [E, h]
      e      = e + Linear(m)
      x      = x + MLP([x^, mean_{in-edges} m, mean_{out-edges} m])

  Messages flow both along and against the edges (a network's later layers inform its earlier ones).
* **Readout**: ``LN`` on nodes and edges, mean over each graph's nodes and over its edges, concatenated,
  ``Linear(2h, h) -> ReLU -> Linear(h, d)`` (then the optional ``output_activation``).

Permutation invariance holds by construction: every operation is per node/edge or a mean over neighbours or over
the graph, and hidden neurons carry no identity. Within a batch, the edges of each large layer of all graphs of one
architecture form a dense block processed with broadcasts and reshaped sums; the remaining edges use
``torch_geometric.utils.scatter`` (and pooling ``torch_geometric.utils.segment``).

Under ``torch.no_grad()`` a memory-lean path (preallocated edge buffers, in-place updates, dense edge blocks handled
by broadcasts and reshaped sums instead of gathers and scatters) computes the same function; it embeds a
ResNet-18 (1.9 M edges) in under a second and ~1 GiB on a 2-core CPU.

Cost of training: a forward+backward step costs about 3 us per edge on a quiet 2-core CPU (edges ~ parameters of
Linear layers, ~ parameters / k^2 of convolutions). For hubs of large networks use ``trainable="readout"``: the
encoder and message passing stay at their initialisation, their pooled output is cached by key, and a step only
trains the readout MLP.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import scatter, segment

from lightning_fms.errors import FMSError
from lightning_fms.weights._batch import StaticBatch, static_batch
from lightning_fms.weights.base import ByteLRU, Featurizer, TrunkCache, check_trainable
from lightning_fms.weights.graph import TOPOLOGY_CACHE
from lightning_fms.weights.schema import GF, NODE_VALUE_FEATURES, NS, NUM_EDGE_TYPES, NUM_NODE_TYPES, GraphOptions
from lightning_fms.weights.topology import GraphTopology, module_tensors

_NODE_SCALARS = ("has_bias", "has_affine", "has_running", "has_stats", "log_numel")
_GROUP_SCALARS = ("depth", "rel_depth", "kernel_h", "kernel_w", "stride", "log_fan_in")


def _symlog(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


class _Block(nn.Module):
    """One residual edge+node update (see the module docstring)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(hidden)
        self.norm_e = nn.LayerNorm(hidden)
        self.src = nn.Linear(hidden, hidden, bias=False)
        self.dst = nn.Linear(hidden, hidden)
        self.edge_out = nn.Linear(hidden, hidden)
        self.node_mlp = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor, pieces: list[Tensor], g: StaticBatch) -> tuple[Tensor, list[Tensor]]:
        """Autograd path.

        Args:
            x: Node states, shape ``[V, h]``.
            pieces: Edge states, one ``[count, h]`` tensor per dense block, then the remainder (if any).
            g: The batch.

        Returns:
            The updated ``(x, pieces)``.
        """
        h = x.shape[1]
        xn = self.norm_x(x)
        s_proj, d_proj = self.src(xn), self.dst(xn)
        agg_in = x.new_zeros(g.num_nodes, h)
        agg_out = x.new_zeros(g.num_nodes, h)
        new: list[Tensor] = []
        for d, e in zip(g.dense, pieces):
            shape = (d.blocks, d.out, d.inn, h)
            m = F.relu(
                self.norm_e(e).view(shape)
                + s_proj.index_select(0, d.in_nodes).view(d.blocks, 1, d.inn, h)
                + d_proj.index_select(0, d.out_nodes).view(d.blocks, d.out, 1, h)
            )
            agg_in = agg_in.index_add(0, d.out_nodes, m.sum(2).reshape(-1, h))
            agg_out = agg_out.index_add(0, d.in_nodes, m.sum(1).reshape(-1, h))
            new.append(e + self.edge_out(m.reshape(-1, h)))
        if g.rest_start < g.num_edges:
            e = pieces[-1]
            src, dst = g.edge_index[0, g.rest_start :], g.edge_index[1, g.rest_start :]
            m = F.relu(self.norm_e(e) + s_proj.index_select(0, src) + d_proj.index_select(0, dst))
            agg_in = agg_in + scatter(m, dst, 0, dim_size=g.num_nodes, reduce="sum")
            agg_out = agg_out + scatter(m, src, 0, dim_size=g.num_nodes, reduce="sum")
            new.append(e + self.edge_out(m))
        x = x + self.node_mlp(torch.cat([xn, agg_in * g.inv_in_deg, agg_out * g.inv_out_deg], 1))
        return x, new

    @torch.no_grad()
    def forward_lean(self, x: Tensor, e: Tensor, g: StaticBatch, buf: Tensor, buf2: Tensor) -> Tensor:
        """The same update without autograd: ``e [E, h]`` is updated in place, ``buf``/``buf2`` are scratch.

        Uses only kernels that are fast for ``[E, 32]`` tensors on a CPU: GEMM/GEMV for the LayerNorm statistics,
        broadcasts and reshaped sums over dense blocks.

        Returns:
            The new ``x``.
        """
        h = x.shape[1]
        xn = self.norm_x(x)
        s_proj = self.src(xn)
        d_proj = self.dst(xn) + self.norm_e.bias
        # LayerNorm statistics of every edge (GEMV): mean, E[e^2] - mean^2
        ones = e.new_full((h, 1), 1.0 / h)
        mean = torch.mm(e, ones)
        torch.mul(e, e, out=buf)
        rstd = torch.mm(buf, ones).sub_(mean * mean).clamp_min_(0).add_(self.norm_e.eps).rsqrt_()
        torch.mul(e, rstd, out=buf2)  # e * rstd
        # buf = A x^[src] + B x^[dst] + LN bias
        for d in g.dense:
            torch.add(
                s_proj.index_select(0, d.in_nodes).view(d.blocks, 1, d.inn, h),
                d_proj.index_select(0, d.out_nodes).view(d.blocks, d.out, 1, h),
                out=buf[d.start : d.start + d.count].view(d.blocks, d.out, d.inn, h),
            )
        rs = g.rest_start
        if rs < g.num_edges:
            src, dst = g.edge_index[0, rs:], g.edge_index[1, rs:]
            torch.add(s_proj.index_select(0, src), d_proj.index_select(0, dst), out=buf[rs:])
        # buf += ((e - mean) * rstd) * weight, then ReLU
        buf.addcmul_(buf2, self.norm_e.weight)
        buf.addr_(mean.mul_(rstd).squeeze(1), self.norm_e.weight, alpha=-1.0)
        buf.relu_()  # buf = m
        agg_in, agg_out = _aggregate_lean(buf, g)
        e.addmm_(buf, self.edge_out.weight.t()).add_(self.edge_out.bias)
        return x + self.node_mlp(torch.cat([xn, agg_in, agg_out], 1))


def _aggregate_lean(m: Tensor, g: StaticBatch) -> tuple[Tensor, Tensor]:
    """Mean of ``m [E, h]`` over each node's in-edges and out-edges (no autograd)."""
    h = m.shape[1]
    agg_in = m.new_zeros(g.num_nodes, h)
    agg_out = m.new_zeros(g.num_nodes, h)
    for d in g.dense:
        mb = m[d.start : d.start + d.count].view(d.blocks, d.out, d.inn, h)
        agg_in.index_add_(0, d.out_nodes, mb.sum(2).reshape(-1, h))
        agg_out.index_add_(0, d.in_nodes, mb.sum(1).reshape(-1, h))
    rs = g.rest_start
    if rs < g.num_edges:
        agg_in.index_add_(0, g.edge_index[1, rs:], m[rs:])
        agg_out.index_add_(0, g.edge_index[0, rs:], m[rs:])
    return agg_in.mul_(g.inv_in_deg), agg_out.mul_(g.inv_out_deg)


class GMNFeaturizer(Featurizer):
    """Graph-metanetwork embedding of checkpoints of any traceable architecture (see the module docstring).

    Args:
        embedding_dim: Output size ``d``.
        hidden_dim: Hidden size ``h`` of nodes and edges.
        num_blocks: Number of message-passing blocks.
        max_kernel_size: ``(Kh, Kw)`` kernel grid of the parameter graphs.
        include_running_stats: Read BatchNorm running statistics as node features.
        output_activation: ``None``, ``"tanh"`` or ``"sigmoid"`` applied to the embedding.
        value_cache_bytes: Budget of the cache of graph values by key (and of batched inputs).
        trainable: ``"all"`` (every parameter is trained through the surrogate's likelihood), ``"readout"``
            (the encoder and message passing are frozen at their seeded initialisation and their pooled output
            is cached by key, so a training step costs only the readout MLP), or ``"auto"`` (default): ``"all"``
            when the featurizer runs on a GPU, ``"readout"`` on a CPU, where a full step costs ~3 us per edge
            (a 100-observation decision of the demo took ~60 s warm-started, ~28 min from scratch).
    """

    def __init__(
        self,
        embedding_dim: int = 32,
        hidden_dim: int = 32,
        num_blocks: int = 4,
        max_kernel_size: tuple[int, int] | int = (3, 3),
        include_running_stats: bool = True,
        output_activation: str | None = None,
        value_cache_bytes: int = 1 << 30,
        trainable: str = "auto",
    ) -> None:
        super().__init__(embedding_dim)
        self.trainable = check_trainable(trainable)
        if isinstance(max_kernel_size, int):
            max_kernel_size = (max_kernel_size, max_kernel_size)
        if output_activation not in (None, "tanh", "sigmoid"):
            raise FMSError(f"output_activation must be None, 'tanh' or 'sigmoid', got {output_activation!r}")
        self.graph_options = GraphOptions(tuple(int(k) for k in max_kernel_size), bool(include_running_stats))  # type: ignore[arg-type]
        self.output_activation = output_activation
        h = int(hidden_dim)
        self.hidden_dim = h
        k = self.graph_options.kernel_numel
        self.node_type = nn.Embedding(NUM_NODE_TYPES, h)
        self.node_pos = nn.Linear(2, h)
        self.node_io = nn.Linear(1, h)
        self.node_feat = nn.Linear(len(_NODE_SCALARS) + 1 + len(NODE_VALUE_FEATURES), h)
        self.edge_type = nn.Embedding(NUM_EDGE_TYPES, h)
        self.edge_group = nn.Linear(len(_GROUP_SCALARS), h)
        self.edge_value = nn.Linear(k, h)
        self.blocks = nn.ModuleList(_Block(h) for _ in range(int(num_blocks)))
        self.final_x = nn.LayerNorm(h)
        self.final_e = nn.LayerNorm(h)
        self.readout = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Linear(h, self.embedding_dim))
        self._values = ByteLRU(value_cache_bytes)
        self._statics = ByteLRU(value_cache_bytes // 4, max_items=16)
        self._batches = ByteLRU(value_cache_bytes, max_items=8)
        self._pooled = TrunkCache(value_cache_bytes // 4)
        self._apply_trainable()

    def is_readout_parameter(self, name: str) -> bool:
        """Whether ``name`` belongs to the readout MLP (the rest is the trunk)."""
        return name.startswith("readout.")

    # ------------------------------------------------------------------ inputs

    def clear_cache(self) -> None:
        """Forget the cached inputs (and, with ``trainable="readout"``, the cached trunk outputs)."""
        self._values.clear()
        self._statics.clear()
        self._batches.clear()
        self._pooled.clear()

    def graph_inputs(
        self, modules: Sequence[nn.Module], keys: Sequence[Hashable] | None = None
    ) -> tuple[StaticBatch, Tensor, Tensor]:
        """The batched graph of ``modules`` on the featurizer's device and dtype (cached; see the class docstring).

        Returns:
            ``(static, node_values [V, 12], edge_values [E, Kh*Kw])``, edge values in the batch's edge order.
        """
        self._check_keys(modules, keys)
        device, dtype = self.device, self.dtype
        batch_key = None
        if keys is not None:
            batch_key = (tuple(keys), device, dtype)
            hit = self._batches.get(batch_key)
            if hit is not None:
                return hit
        topologies: list[GraphTopology] = []
        node_values: list[Tensor] = []
        edge_values: list[Tensor] = []
        for i, module in enumerate(modules):
            key = keys[i] if keys is not None else None
            entry = self._values.get(key) if key is not None else None
            if entry is None:
                topo = TOPOLOGY_CACHE.get(module, self.graph_options)
                nv, ev = topo.extract(module_tensors(module))
                entry = (topo, nv, ev)
                if key is not None:
                    self._values.put(key, entry)
            topologies.append(entry[0])
            node_values.append(entry[1].to(device, dtype))
            edge_values.append(entry[2].to(device, dtype))
        skey = (tuple(t.signature for t in topologies), device, dtype)
        static = self._statics.get(skey)
        if static is None:
            static = static_batch(topologies).to(device, dtype)
            self._statics.put(skey, static)
        nv_all = torch.cat(node_values) if len(node_values) > 1 else node_values[0]
        ev_all = torch.cat(edge_values) if len(edge_values) > 1 else edge_values[0]
        if static.edge_perm is not None:
            ev_all = ev_all.index_select(0, static.edge_perm)
        result = (static, nv_all, ev_all)
        if batch_key is not None:
            self._batches.put(batch_key, result)
        return result

    # ------------------------------------------------------------------ network

    def _encode(self, g: StaticBatch, node_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ns = g.node_static
        io = ns[:, NS["io_pos"] : NS["io_pos"] + 1]
        is_io = (io >= 0).to(ns.dtype)
        scalars = ns[:, [NS[c] for c in _NODE_SCALARS]]
        parts = torch.log1p(ns[:, NS["num_parts"] : NS["num_parts"] + 1])
        x = (
            self.node_type(ns[:, NS["type"]].long())
            + torch.sin(self.node_pos(ns[:, [NS["depth"], NS["rel_depth"]]]))
            + is_io * torch.sin(self.node_io(io.clamp_min(0)))
            + self.node_feat(torch.cat([scalars, parts, _symlog(node_values)], 1))
        )
        ga = g.group_attr
        group = self.edge_type(ga[:, GF["type"]].long()) + torch.sin(
            self.edge_group(ga[:, [GF[c] for c in _GROUP_SCALARS]])
        )
        scale = torch.exp(0.5 * ga[:, GF["log_fan_in"]])
        return x, group, scale

    def _pool(self, g: StaticBatch, x: Tensor, edge_sum: Tensor) -> Tensor:
        """Mean of final node states and mean of final edge states per graph, shape ``[B, 2h]``."""
        xs = segment(self.final_x(x), g.node_ptr, reduce="sum") * g.inv_nodes
        return torch.cat([xs, edge_sum * g.inv_edges], 1)

    def head(self, pooled: Tensor) -> Tensor:
        """Readout MLP (and output activation): ``[B, 2h] -> [B, embedding_dim]``."""
        out = self.readout(pooled)
        if self.output_activation == "tanh":
            out = torch.tanh(out)
        elif self.output_activation == "sigmoid":
            out = torch.sigmoid(out)
        return out

    def _edge_sum(self, g: StaticBatch, pieces: list[Tensor], like: Tensor) -> Tensor:
        """Per-graph sums of ``final_e`` over the edge pieces (autograd path), shape ``[B, h]``."""
        out = like.new_zeros(g.num_graphs, self.hidden_dim)
        for d, e in zip(g.dense, pieces):
            sums = self.final_e(e).view(d.num_graphs, -1, self.hidden_dim).sum(1)
            out = out.index_add(0, torch.arange(d.first_graph, d.first_graph + d.num_graphs, device=out.device), sums)
        if g.rest_start < g.num_edges:
            rest = self.final_e(pieces[-1])
            out = out + scatter(rest, g.edge_batch[g.rest_start :], 0, dim_size=g.num_graphs, reduce="sum")
        return out

    @torch.no_grad()
    def _edge_sum_lean(self, g: StaticBatch, e: Tensor) -> Tensor:
        """Per-graph sums of ``final_e(e)`` without ``[E, h]`` temporaries: ``w * sum(rstd * (e - mean)) + n b``."""
        ln = self.final_e
        h = e.shape[1]
        ones = e.new_full((h, 1), 1.0 / h)
        mean = torch.mm(e, ones)
        sq = torch.empty_like(mean)
        chunk = 1 << 16
        for s in range(0, e.shape[0], chunk):
            part = e[s : s + chunk]
            torch.mm(part * part, ones, out=sq[s : s + chunk])
        rstd = sq.sub_(mean * mean).clamp_min_(0).add_(ln.eps).rsqrt_()
        shift = mean.mul_(rstd)  # mean * rstd
        out = e.new_zeros(g.num_graphs, h)
        for d in g.dense:
            r = d.num_graphs
            blk = e[d.start : d.start + d.count].view(r, -1, h)
            w = rstd[d.start : d.start + d.count].view(r, -1, 1)
            normed = torch.bmm(blk.transpose(1, 2), w).squeeze(2) - shift[d.start : d.start + d.count].view(r, -1).sum(
                1, keepdim=True
            )
            n = d.count // r
            out[d.first_graph : d.first_graph + r] += normed * ln.weight + n * ln.bias
        rs = g.rest_start
        if rs < g.num_edges:
            out += scatter(ln(e[rs:]), g.edge_batch[rs:], 0, dim_size=g.num_graphs, reduce="sum")
        return out

    def embed_graphs(self, g: StaticBatch, node_values: Tensor, edge_values: Tensor) -> Tensor:
        """Embed a batch of graphs.

        Args:
            g: Static batch (on the featurizer's device/dtype).
            node_values: Shape ``[V, 12]``.
            edge_values: Shape ``[E, Kh*Kw]``, in the batch's edge order.

        Returns:
            Shape ``[B, embedding_dim]``.
        """
        return self.head(self.trunk(g, node_values, edge_values))

    def trunk(self, g: StaticBatch, node_values: Tensor, edge_values: Tensor) -> Tensor:
        """Encoder, message passing and pooling: the pooled graph features, shape ``[B, 2h]``.

        Under ``torch.no_grad()`` this takes the memory-lean path (same function, in-place edge updates).
        """
        x, group, scale = self._encode(g, node_values)
        if not torch.is_grad_enabled() and g.num_edges > 0:
            return self._trunk_lean(g, x, group, scale, edge_values)
        pieces: list[Tensor] = []
        for d in g.dense:
            v = edge_values[d.start : d.start + d.count] * scale[d.group]
            pieces.append(group[d.group] + self.edge_value(v))
        if g.rest_start < g.num_edges:
            gid = g.edge_group[g.rest_start :]
            v = edge_values[g.rest_start :] * scale.index_select(0, gid).unsqueeze(1)
            pieces.append(group.index_select(0, gid) + self.edge_value(v))
        for block in self.blocks:
            x, pieces = block(x, pieces, g)
        return self._pool(g, x, self._edge_sum(g, pieces, x))

    @torch.no_grad()
    def _trunk_lean(self, g: StaticBatch, x: Tensor, group: Tensor, scale: Tensor, values: Tensor) -> Tensor:
        n_e, h = g.num_edges, self.hidden_dim
        e = torch.empty(n_e, h, dtype=x.dtype, device=x.device)
        w, b = self.edge_value.weight.t(), self.edge_value.bias
        scale_list = scale.tolist()
        for d in g.dense:
            rows = slice(d.start, d.start + d.count)
            torch.addmm(group[d.group] + b, values[rows], w, alpha=scale_list[d.group], out=e[rows])
        rs = g.rest_start
        if rs < n_e:
            gid = g.edge_group[rs:]
            v = values[rs:] * scale.index_select(0, gid).unsqueeze(1)
            torch.addmm(b, v, w, out=e[rs:])
            e[rs:] += group.index_select(0, gid)
        buf = torch.empty_like(e)
        buf2 = torch.empty_like(e)
        for block in self.blocks:
            x = block.forward_lean(x, e, g, buf, buf2)
        del buf, buf2
        return self._pool(g, x, self._edge_sum_lean(g, e))

    def forward(
        self,
        modules: Sequence[nn.Module],
        keys: Sequence[Hashable] | None = None,
        references: Sequence[nn.Module] | None = None,
    ) -> Tensor:
        """Embed modules (see :meth:`Featurizer.forward`), shape ``[B, embedding_dim]``; ``references`` are unused."""
        if len(modules) == 0:
            return self._ref.new_zeros(0, self.embedding_dim)
        self._sync_trainable()
        if self.effective_trainable == "readout":
            return self.head(self._frozen_trunk(modules, keys))
        if len(self._pooled):  # "auto" on a GPU trains the trunk: outputs cached on a CPU would go stale
            self._pooled.clear()
        g, node_values, edge_values = self.graph_inputs(modules, keys)
        return self.embed_graphs(g, node_values, edge_values)

    def _frozen_trunk(self, modules: Sequence[nn.Module], keys: Sequence[Hashable] | None) -> Tensor:
        """Pooled trunk features with a frozen trunk, cached by key (``trainable="readout"``)."""
        self._check_keys(modules, keys)

        def compute(todo: list[int]) -> Tensor:
            sub_keys = [keys[i] for i in todo] if keys is not None else None
            return self.trunk(*self.graph_inputs([modules[i] for i in todo], sub_keys))

        return self._pooled.rows(keys, len(modules), self.device, self.dtype, compute)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):  # noqa: ANN001, D102
        if self._trunk_state_changes(state_dict, prefix):  # a state with the same trunk keeps the cached outputs
            self._pooled.clear()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
