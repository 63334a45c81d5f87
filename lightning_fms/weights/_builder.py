"""Build a :class:`GraphTopology` by tracing a module with ``torch.fx`` and interpreting the program abstractly.

Every value of the traced program is one of:

* ``_Act``: an activation whose feature dimension ``fdim`` is indexed by the concatenated node *segments*
  ``(set, lo, hi)``; ``flat`` marks features flattened together with spatial positions (``"major"``: index
  ``c * k + r``, ``"minor"``: ``r * C + c``, ``k`` unknown until a ``Linear`` reads it); ``rank`` is known when a
  layer fixes it (a ``Conv2d`` output has rank 4) and ``None`` otherwise.
* ``_Lazy``: a network input not yet sized; the first layer that reads it creates the input nodes.
* ``_Param``: a parameter or buffer (or a view of one).
* ``FREE``: anything without neuron identity (shapes, masks, statistics reduced over the features, constants).
* ``_Tuple``/``_Repeat``: containers (attention outputs, splits).

Operations the interpreter does not model raise ``_Unsupported``; the caller then builds the statistics fallback.
"""

from __future__ import annotations

import builtins
import inspect
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from lightning_fms.weights.graph import (
    GF,
    GROUP_FEATURES,
    NODE_STATIC_FEATURES,
    NS,
    NV,
    EdgeType,
    EdgeValueSpec,
    GraphOptions,
    GraphTopology,
    LayerRecord,
    NodeType,
    NodeValueSpec,
    SymmetryInfo,
    module_tensors,
)

Seg = tuple[int, int, int]


class _Unsupported(Exception):
    """The traced program uses something the interpreter does not model."""


@dataclass(frozen=True)
class _Act:
    segs: tuple[Seg, ...]
    fdim: int | None
    rank: int | None
    flat: str | None = None

    @property
    def size(self) -> int:
        return sum(hi - lo for _, lo, hi in self.segs)


@dataclass(eq=False)
class _Lazy:
    name: str


@dataclass(frozen=True)
class _Param:
    name: str
    transposed: bool = False


class _FreeType:
    def __repr__(self) -> str:
        return "FREE"


FREE = _FreeType()


@dataclass(frozen=True)
class _Tuple:
    items: tuple[Any, ...]


@dataclass(frozen=True)
class _Repeat:
    item: Any


# ----------------------------------------------------------------------------------------------- op tables

_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, n)
    for n in (
        "ReLU ReLU6 LeakyReLU ELU SELU CELU GELU SiLU Mish Hardswish Hardsigmoid Hardtanh Sigmoid Tanh Softplus "
        "Softsign Tanhshrink Softshrink Hardshrink Threshold LogSigmoid Softmax LogSoftmax Softmin Softmax2d "
        "Dropout Dropout1d Dropout2d Dropout3d AlphaDropout FeatureAlphaDropout Identity "
        "MaxPool1d MaxPool2d MaxPool3d AvgPool1d AvgPool2d AvgPool3d AdaptiveAvgPool1d AdaptiveAvgPool2d "
        "AdaptiveAvgPool3d AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d LPPool1d LPPool2d Upsample "
        "UpsamplingNearest2d UpsamplingBilinear2d ZeroPad1d ZeroPad2d ZeroPad3d ConstantPad1d ConstantPad2d "
        "ConstantPad3d ReflectionPad1d ReflectionPad2d ReflectionPad3d ReplicationPad1d ReplicationPad2d "
        "ReplicationPad3d CircularPad1d CircularPad2d CircularPad3d"
    ).split()
    if hasattr(nn, n)
)

_UNARY_FUNCS: set[Any] = {
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.log,
    torch.abs,
    torch.neg,
    torch.clamp,
    torch.clip,
    torch.erf,
    torch.square,
    torch.sqrt,
    torch.rsqrt,
    torch.sin,
    torch.cos,
    torch.softmax,
    torch.log_softmax,
    torch.clone,
    torch.detach,
    torch.nan_to_num,
    torch.dropout,
    operator.neg,
    operator.pos,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.elu,
    F.selu,
    F.celu,
    F.leaky_relu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
    F.softsign,
    F.tanhshrink,
    F.logsigmoid,
    F.sigmoid,
    F.tanh,
    F.threshold,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    F.normalize,
    F.softmax,
    F.log_softmax,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.lp_pool1d,
    F.lp_pool2d,
    F.interpolate,
    F.upsample,
    F.pad,
}
#: Functions recognised by name (they live in optional packages): per-sample random scaling, equivariant.
_PASS_THROUGH_NAMES = {"stochastic_depth", "drop_path", "drop_block_2d", "drop_block_fast_2d"}
_UNARY_METHODS = set(
    (
        "relu relu_ sigmoid sigmoid_ tanh tanh_ exp exp_ log abs abs_ neg clamp clamp_ clamp_min clamp_max clip "
        "contiguous float double half bfloat16 to type type_as clone detach softmax log_softmax sqrt rsqrt "
        "square sin cos erf cpu cuda requires_grad_ masked_fill masked_fill_ nan_to_num"
    ).split()
)
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"}
_SUB = {operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_", "__sub__"}
_MUL = {operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_", "__mul__", "__rmul__"}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_", "__truediv__"}
_MATMUL = {operator.matmul, torch.matmul, torch.mm, "matmul", "mm"}
_POW = {operator.pow, torch.pow, "pow", "__pow__"}
_REDUCE = {
    torch.mean: "mean",
    torch.sum: "sum",
    torch.amax: "amax",
    torch.amin: "amin",
    torch.max: "max",
    torch.min: "min",
    torch.std: "std",
    torch.var: "var",
    torch.norm: "norm",
    torch.logsumexp: "logsumexp",
    torch.prod: "prod",
}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod"}
_CREATE = {
    torch.zeros,
    torch.ones,
    torch.full,
    torch.arange,
    torch.randn,
    torch.rand,
    torch.empty,
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
    torch.rand_like,
    torch.randn_like,
    torch.empty_like,
    torch.tensor,
    torch.as_tensor,
    torch.eye,
    torch.linspace,
    torch.triu,
    torch.tril,
}


def _arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _contains(value: Any, cls: type | tuple[type, ...]) -> bool:
    if isinstance(value, cls):
        return True
    if isinstance(value, (list, tuple)):
        return any(_contains(v, cls) for v in value)
    if isinstance(value, dict):
        return any(_contains(v, cls) for v in value.values())
    if isinstance(value, slice):
        return any(_contains(v, cls) for v in (value.start, value.stop, value.step))
    if isinstance(value, (_Tuple,)):
        return any(_contains(v, cls) for v in value.items)
    return False


def _first(value: Any, cls: type) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, (list, tuple)):
        for v in value:
            found = _first(v, cls)
            if found is not None:
                return found
    if isinstance(value, dict):
        return _first(list(value.values()), cls)
    return None


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    return None


def _kernel_hw(k: Sequence[int]) -> tuple[int, int]:
    if len(k) == 0:
        return 1, 1
    if len(k) == 1:
        return 1, int(k[0])
    if len(k) == 2:
        return int(k[0]), int(k[1])
    return int(math.prod(k[:-1])), int(k[-1])


class _Tracer(fx.Tracer):
    """``torch.nn`` layers are leaves; user-written modules (and containers) are traced through."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return type(m).__module__.startswith(("torch.nn", "torch.ao.nn"))


def _leaf_root(module: nn.Module) -> bool:
    return _Tracer().is_leaf_module(module, "")


# ------------------------------------------------------------------------------------------------------- builder


@dataclass
class _SetInfo:
    start: int
    size: int
    type: int
    depth: int


class _Builder:
    def __init__(self, root: nn.Module, options: GraphOptions) -> None:
        self.root = root
        self.options = options
        self.tensors = module_tensors(root)
        self.sets: list[_SetInfo] = []
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
        self.lazy_map: dict[int, _Act] = {}
        self.dense: dict[int, tuple[int, int, int, Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ primitives

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
        if size <= 0:
            raise _Unsupported(f"empty neuron set ({ntype.name})")
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
        self.sets.append(_SetInfo(self.num_nodes, size, int(ntype), depth))
        self.num_nodes += size
        return sid

    def nodes(self, segs: Sequence[Seg]) -> Tensor:
        parts = [torch.arange(self.sets[s].start + lo, self.sets[s].start + hi) for s, lo, hi in segs]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def set_nodes(self, sid: int) -> Tensor:
        info = self.sets[sid]
        return torch.arange(info.start, info.start + info.size)

    def depth(self, *acts: _Act) -> int:
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

    def identity_edges(self, a: _Act, sid: int, etype: EdgeType, value: float = 1.0) -> None:
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
        if name is None:
            return
        t = self.tensors[name]
        n = (rows[1] - rows[0]) if rows is not None else t.numel()
        if n != self.sets[sid].size:
            raise _Unsupported(f"{name} has {n} values for {self.sets[sid].size} neurons")
        self.node_specs.append(NodeValueSpec(name, self.set_nodes(sid), "vector", column=NV[column], rows=rows))
        self.used.add(name)
        if rows is None:
            self.sym.param_axes.append((name, 0, ((sid, 0, self.sets[sid].size),), None, 1, None))

    def tensor(self, name: str) -> Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise _Unsupported(f"unknown tensor {name}")
        if isinstance(t, nn.parameter.UninitializedParameter):
            raise _Unsupported(f"{name} is uninitialised (lazy module)")
        return t

    def act(self, v: Any, size: int, fdim: int, rank: int | None) -> _Act:
        """Return ``v`` as an activation, creating input nodes for a not-yet-sized network input."""
        if isinstance(v, _Act):
            return v
        if isinstance(v, _Lazy):
            got = self.lazy_map.get(id(v))
            if got is not None:
                if got.size != size:
                    raise _Unsupported(f"input {v.name} read with sizes {got.size} and {size}")
                return got
            sid = self.new_set(size, NodeType.INPUT, 0, io=True)
            self.sym.frozen.add(sid)
            got = _Act(((sid, 0, size),), fdim, rank)
            self.lazy_map[id(v)] = got
            return got
        raise _Unsupported(f"a layer reads {v!r}, which carries no neurons")

    @staticmethod
    def same_dim(x: _Act, d: int) -> bool | None:
        if x.fdim is None:
            return False
        if x.rank is not None:
            return d % x.rank == x.fdim % x.rank
        if (d >= 0) == (x.fdim >= 0):
            return d == x.fdim
        return None

    def require_last(self, x: _Act, what: str) -> None:
        if x.fdim is None:
            raise _Unsupported(f"{what} reads an activation without a feature dimension")
        if x.rank is not None and x.fdim % x.rank != x.rank - 1:
            raise _Unsupported(f"{what} reads dimension -1 but the features are in dimension {x.fdim}")
        if x.rank is None and x.fdim >= 0 and x.fdim != 1:
            raise _Unsupported(f"{what} reads dimension -1 but the features are in dimension {x.fdim}")

    def require_channel(self, x: _Act, what: str) -> None:
        if x.fdim is None:
            raise _Unsupported(f"{what} reads an activation without a feature dimension")
        ok = self.same_dim(x, 1)
        if ok is False or (ok is None and x.fdim != -1):
            raise _Unsupported(f"{what} reads dimension 1 but the features are in dimension {x.fdim}")

    # ------------------------------------------------------------------ layers

    def linear(self, x: Any, wname: str, bname: str | None, *, transposed: bool = False) -> _Act:
        w = self.tensor(wname)
        if w.dim() != 2:
            raise _Unsupported(f"linear weight {wname} has shape {tuple(w.shape)}")
        in_f, out_f = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
        x = self.act(x, in_f, -1, None)
        self.require_last(x, f"linear layer {wname}")
        n = x.size
        k = 1
        if x.flat is not None:
            if in_f % n:
                raise _Unsupported(f"{wname} reads {in_f} features from {n} flattened channels")
            k = in_f // n
            if transposed and k > 1:
                raise _Unsupported("x @ W on a flattened feature map")
        elif in_f != n:
            raise _Unsupported(f"{wname} expects {in_f} features, the traced input has {n}")
        if bname is not None and self.tensor(bname).numel() != out_f:
            raise _Unsupported(f"bias {bname} does not match {wname}")
        depth = self.depth(x) + 1
        out = self.new_set(out_f, NodeType.LINEAR, depth, has_bias=bname is not None)
        in_nodes, out_nodes = self.nodes(x.segs), self.set_nodes(out)
        src, dst = in_nodes.repeat(out_f), out_nodes.repeat_interleave(n)
        if k > 1:
            spec = EdgeValueSpec(src.numel(), wname, "flat", flat_k=k, flat_layout=x.flat or "major")
            self.add_edges(
                src,
                dst,
                spec,
                EdgeType.FLAT_LINEAR,
                depth,
                kernel=(1, k),
                fan_in=in_f,
                dense=(1, out_f, n, in_nodes, out_nodes),
            )
        else:
            spec = EdgeValueSpec(src.numel(), wname, "transpose" if transposed else "kernel")
            self.add_edges(
                src, dst, spec, EdgeType.LINEAR, depth, fan_in=in_f, dense=(1, out_f, n, in_nodes, out_nodes)
            )
        self.node_vector(bname, out, "bias")
        out_axis, in_axis = (1, 0) if transposed else (0, 1)
        self.sym.param_axes.append((wname, out_axis, ((out, 0, out_f),), None, 1, None))
        self.sym.param_axes.append((wname, in_axis, x.segs, x.flat if k > 1 else None, k, None))
        self.layers.append(LayerRecord("linear", wname, bname, x.segs, out, plain=not transposed and k == 1))
        return _Act(((out, 0, out_f),), -1, x.rank)

    def conv(
        self,
        x: Any,
        wname: str,
        bname: str | None,
        *,
        groups: int = 1,
        stride: Any = 1,
        transposed: bool = False,
    ) -> _Act:
        w = self.tensor(wname)
        if w.dim() < 3:
            raise _Unsupported(f"convolution weight {wname} has shape {tuple(w.shape)}")
        nd = w.dim() - 2
        groups = int(groups)
        if transposed:
            in_c, og = w.shape[0], w.shape[1]
            out_c, ig = og * groups, in_c // groups
        else:
            out_c, ig = w.shape[0], w.shape[1]
            in_c, og = ig * groups, out_c // groups
        x = self.act(x, in_c, 1, nd + 2)
        self.require_channel(x, f"convolution {wname}")
        if x.flat is not None or x.size != in_c:
            raise _Unsupported(f"{wname} expects {in_c} channels, the traced input has {x.size}")
        if bname is not None and self.tensor(bname).numel() != out_c:
            raise _Unsupported(f"bias {bname} does not match {wname}")
        depth = self.depth(x) + 1
        out = self.new_set(out_c, NodeType.CONV, depth, has_bias=bname is not None)
        in_nodes, out_nodes = self.nodes(x.segs), self.set_nodes(out)
        src = in_nodes.view(groups, ig)[torch.arange(out_c) // og].reshape(-1)
        dst = out_nodes.repeat_interleave(ig)
        kind = "transpose" if transposed else "kernel"
        spec = EdgeValueSpec(src.numel(), wname, kind, groups=groups)
        s = stride if isinstance(stride, int) else max(int(v) for v in stride)
        etype = EdgeType.CONV_TRANSPOSE if transposed else EdgeType.CONV
        ksz = tuple(int(v) for v in w.shape[2:])
        self.add_edges(
            src,
            dst,
            spec,
            etype,
            depth,
            kernel=_kernel_hw(ksz),
            stride=s,
            fan_in=ig * math.prod(ksz),
            dense=(groups, og, ig, in_nodes, out_nodes),
        )
        self.node_vector(bname, out, "bias")
        out_axis, in_axis = (1, 0) if transposed else (0, 1)
        if groups == 1:
            self.sym.param_axes.append((wname, out_axis, ((out, 0, out_c),), None, 1, None))
            self.sym.param_axes.append((wname, in_axis, x.segs, None, 1, None))
        else:
            self.sym.frozen.add(out)
            self.sym.frozen.update(sid for sid, _, _ in x.segs)
        plain = groups == 1 and not transposed
        self.layers.append(LayerRecord("conv", wname, bname, x.segs, out, plain=plain))
        return _Act(((out, 0, out_c),), 1, x.rank if x.rank is not None else nd + 2)

    def norm(
        self,
        x: Any,
        ntype: NodeType,
        size: int,
        wname: str | None,
        bname: str | None,
        mean_name: str | None = None,
        var_name: str | None = None,
        *,
        channel_first: bool,
        groups: int = 0,
    ) -> _Act:
        x = self.act(x, size, 1 if channel_first else -1, None)
        what = f"{ntype.name.lower()} of {size} features"
        if channel_first:
            self.require_channel(x, what)
        else:
            self.require_last(x, what)
        if x.flat is not None or x.size != size:
            raise _Unsupported(f"{what} applied to {x.size} traced features")
        running = self.options.include_running_stats and mean_name is not None and var_name is not None
        part = None
        if groups:
            part = torch.arange(size) // (size // groups)
        out = self.new_set(
            size,
            ntype,
            self.depth(x),
            part=part,
            num_parts=groups,
            has_bias=False,
            has_affine=wname is not None or bname is not None,
            has_running=running,
        )
        self.identity_edges(x, out, EdgeType.NORM)
        self.node_vector(wname, out, "gamma")
        self.node_vector(bname, out, "beta")
        if running:
            self.node_vector(mean_name, out, "running_mean")
            self.node_vector(var_name, out, "running_var")
        if groups:
            gset = self.new_set(groups, NodeType.NORM_GROUP, self.sets[out].depth, part=torch.arange(groups))
            src = self.set_nodes(gset).repeat_interleave(size // groups)
            spec = EdgeValueSpec(size, None, "const")
            self.add_edges(src, self.set_nodes(out), spec, EdgeType.NORM_GROUP, self.sets[out].depth, head=part)
            self.sym.frozen.update((out, gset))
        return _Act(((out, 0, size),), x.fdim, x.rank)

    def merge(self, a: _Act, b: _Act, op: str) -> _Act:
        if a.segs == b.segs and a.flat == b.flat and op != "sub":
            return a
        if a.flat is not None or b.flat is not None:
            raise _Unsupported(f"elementwise {op} of flattened feature maps")
        if a.size != b.size:
            if b.size == 1 and op != "cat":
                return a
            if a.size == 1 and op != "cat":
                return b
            raise _Unsupported(f"elementwise {op} of {a.size} and {b.size} features")
        ntype = {"add": NodeType.ADD, "sub": NodeType.ADD, "cat": NodeType.MERGE}.get(op, NodeType.MUL)
        etype = EdgeType.MUL if ntype == NodeType.MUL else EdgeType.RESIDUAL
        out = self.new_set(a.size, ntype, self.depth(a, b))
        self.identity_edges(a, out, etype)
        self.identity_edges(b, out, etype, -1.0 if op == "sub" else 1.0)
        fdim, rank = (a.fdim, a.rank) if a.rank is not None or b.rank is None else (b.fdim, b.rank)
        return _Act(((out, 0, a.size),), fdim, rank)

    def param_op(self, x: _Act, p: _Param, op: str, *, reverse: bool = False) -> _Act:
        t = self.tensor(p.name)
        n = x.size
        if x.flat is not None:
            raise _Unsupported(f"parameter {p.name} applied to a flattened feature map")
        axis: int | None = None
        if x.fdim is not None and t.dim() > 0:
            if x.rank is not None:
                cand = t.dim() - (x.rank - x.fdim % x.rank)
            elif x.fdim < 0:
                cand = t.dim() + x.fdim
            else:
                cand = x.fdim - 1 if t.dim() == 1 and x.fdim == 1 else None
            if cand is not None and 0 <= cand < t.dim() and t.shape[cand] == n:
                axis = cand
        if t.numel() > 1 and axis is None and any(s == n for s in t.shape) and t.dim() == 1:
            raise _Unsupported(f"cannot align parameter {p.name} {tuple(t.shape)} with the features")
        vector = axis is not None and t.numel() == n
        column = None
        if vector and op in ("add", "sub"):
            column = "bias"
        elif vector and op == "mul":
            column = "gamma"
        out = self.new_set(
            n,
            NodeType.PARAM_OP,
            self.depth(x),
            has_bias=column == "bias",
            has_affine=column == "gamma",
            has_stats=column is None,
            log_numel=math.log1p(t.numel()),
        )
        self.identity_edges(x, out, EdgeType.PARAM_OP, -1.0 if (op == "sub" and reverse) else 1.0)
        nodes = self.set_nodes(out)
        if column is not None:
            scale = -1.0 if (op == "sub" and not reverse) else 1.0
            self.node_specs.append(NodeValueSpec(p.name, nodes, "vector", column=NV[column], scale=scale))
        else:
            self.node_specs.append(NodeValueSpec(p.name, nodes, "colstats", axis=axis))
        self.used.add(p.name)
        if axis is not None:
            self.sym.param_axes.append((p.name, axis, ((out, 0, n),), None, 1, None))
        return _Act(((out, 0, n),), x.fdim, x.rank)

    def embedding(self, ids: Any, wname: str) -> _Act:
        if isinstance(ids, _Act):
            raise _Unsupported("embedding of an activation")
        w = self.tensor(wname)
        if w.dim() != 2:
            raise _Unsupported(f"embedding table {wname} has shape {tuple(w.shape)}")
        d = w.shape[1]
        out = self.new_set(d, NodeType.EMBEDDING, 1, has_stats=True, log_numel=math.log1p(w.numel()))
        self.node_specs.append(NodeValueSpec(wname, self.set_nodes(out), "colstats", axis=1))
        self.used.add(wname)
        self.sym.param_axes.append((wname, 1, ((out, 0, d),), None, 1, None))
        self.layers.append(LayerRecord("embedding", wname, None, (), out, plain=False))
        return _Act(((out, 0, d),), -1, None)

    def attention(self, mod: nn.MultiheadAttention, name: str, q: Any, k: Any, v: Any) -> _Tuple:
        e, h = mod.embed_dim, mod.num_heads
        hd = e // h
        pre = f"{name}." if name else ""
        q = self.act(q, e, -1, None)
        k = self.act(k, mod.kdim, -1, None)
        v = self.act(v, mod.vdim, -1, None)
        for a, n, what in ((q, e, "query"), (k, mod.kdim, "key"), (v, mod.vdim, "value")):
            self.require_last(a, f"attention {what}")
            if a.flat is not None or a.size != n:
                raise _Unsupported(f"attention {what} has {a.size} features, expected {n}")
        depth = self.depth(q, k, v) + 1
        head = torch.arange(e) // hd
        bias = f"{pre}in_proj_bias" if mod.in_proj_bias is not None else None
        sets = []
        for ntype in (NodeType.ATTN_Q, NodeType.ATTN_K, NodeType.ATTN_V):
            sets.append(self.new_set(e, ntype, depth, part=head, num_parts=h, has_bias=bias is not None))
        qs, ks, vs = sets
        packed = mod._qkv_same_embed_dim
        for i, (a, sid, etype) in enumerate(
            ((q, qs, EdgeType.ATTN_Q), (k, ks, EdgeType.ATTN_K), (v, vs, EdgeType.ATTN_V))
        ):
            wname = f"{pre}in_proj_weight" if packed else f"{pre}{'qkv'[i]}_proj_weight"
            rows = (i * e, (i + 1) * e) if packed else None
            n_in = a.size
            in_nodes, set_nodes = self.nodes(a.segs), self.set_nodes(sid)
            src, dst = in_nodes.repeat(e), set_nodes.repeat_interleave(n_in)
            spec = EdgeValueSpec(src.numel(), wname, "kernel", rows=rows)
            self.tensor(wname)
            self.add_edges(
                src,
                dst,
                spec,
                etype,
                depth,
                fan_in=n_in,
                head=head.repeat_interleave(n_in),
                dense=(1, e, n_in, in_nodes, set_nodes),
            )
            if bias is not None:
                self.node_vector(bias, sid, "bias", rows=(i * e, (i + 1) * e))
            if packed:
                self.sym.param_axes.append((wname, 1, a.segs, None, 1, (0, i * e, (i + 1) * e)))
            else:
                self.sym.param_axes.append((wname, 1, a.segs, None, 1, None))
                self.sym.param_axes.append((wname, 0, ((sid, 0, e),), None, 1, None))
        qkv = ((qs, 0, e), (ks, 0, e), (vs, 0, e))
        if packed:
            self.sym.param_axes.append((f"{pre}in_proj_weight", 0, qkv, None, 1, None))
        if bias is not None:
            self.sym.param_axes.append((bias, 0, qkv, None, 1, None))
        for extra, sid in ((f"{pre}bias_k", ks), (f"{pre}bias_v", vs)):
            if extra in self.tensors:
                self.node_specs.append(NodeValueSpec(extra, self.set_nodes(sid), "vector", column=NV["beta"]))
                self.sym.param_axes.append((extra, 2, ((sid, 0, e),), None, 1, None))
                self.used.add(extra)
        # query i pairs with key i in the dot product
        const = EdgeValueSpec(e, None, "const")
        self.add_edges(self.set_nodes(qs), self.set_nodes(ks), const, EdgeType.ATTN_QK, depth, head=head)
        self.sym.ties.append((((qs, 0, e),), ks))
        # one node per head: queries and keys of the head feed it, it weighs the head's values
        hs = self.new_set(h, NodeType.ATTN_HEAD, depth, part=torch.arange(h), num_parts=h)
        hn = self.set_nodes(hs)[head]
        for sid in (qs, ks):
            self.add_edges(self.set_nodes(sid), hn, EdgeValueSpec(e, None, "const"), EdgeType.HEAD_IN, depth, head=head)
        self.add_edges(hn, self.set_nodes(vs), EdgeValueSpec(e, None, "const"), EdgeType.HEAD_OUT, depth, head=head)
        self.sym.frozen.add(hs)
        self.sym.attention.append((qs, ks, vs, h))
        # output projection
        ow, ob = f"{pre}out_proj.weight", (f"{pre}out_proj.bias" if mod.out_proj.bias is not None else None)
        out = self.new_set(e, NodeType.ATTN_OUT, depth + 1, has_bias=ob is not None)
        v_nodes, o_nodes = self.set_nodes(vs), self.set_nodes(out)
        src, dst = v_nodes.repeat(e), o_nodes.repeat_interleave(e)
        self.tensor(ow)
        self.add_edges(
            src,
            dst,
            EdgeValueSpec(e * e, ow, "kernel"),
            EdgeType.ATTN_OUT,
            depth + 1,
            fan_in=e,
            head=head.repeat(e),
            dense=(1, e, e, v_nodes, o_nodes),
        )
        self.node_vector(ob, out, "bias")
        self.sym.param_axes.append((ow, 0, ((out, 0, e),), None, 1, None))
        self.sym.param_axes.append((ow, 1, ((vs, 0, e),), None, 1, None))
        self.layers.append(LayerRecord("attention", None, None, q.segs, out, plain=False))
        return _Tuple((_Act(((out, 0, e),), -1, q.rank), FREE))

    def encoder_layer(self, mod: nn.TransformerEncoderLayer, name: str, x: Any) -> _Act:
        pre = f"{name}." if name else ""
        act_fn = mod.activation
        if isinstance(act_fn, nn.Module) and any(True for _ in act_fn.parameters()):
            raise _Unsupported("encoder layer activation with parameters")

        def sa(h: _Act) -> _Act:
            return self.attention(mod.self_attn, f"{pre}self_attn", h, h, h).items[0]

        def ff(h: _Act) -> _Act:
            h = self.call_layer(mod.linear1, f"{pre}linear1", [h], {})
            return self.call_layer(mod.linear2, f"{pre}linear2", [h], {})

        def ln(m: nn.Module, sub: str, h: _Act) -> _Act:
            return self.call_layer(m, f"{pre}{sub}", [h], {})

        x = self.act(x, mod.self_attn.embed_dim, -1, None)
        if mod.norm_first:
            x = self.merge(x, sa(ln(mod.norm1, "norm1", x)), "add")
            x = self.merge(x, ff(ln(mod.norm2, "norm2", x)), "add")
        else:
            x = ln(mod.norm1, "norm1", self.merge(x, sa(x), "add"))
            x = ln(mod.norm2, "norm2", self.merge(x, ff(x), "add"))
        return x

    # ------------------------------------------------------------------ dispatch of modules

    def call_layer(self, mod: nn.Module, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        pre = f"{name}." if name else ""

        def opt(attr: str) -> str | None:
            return f"{pre}{attr}" if getattr(mod, attr, None) is not None else None

        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if isinstance(mod, nn.Linear):
            return self.linear(x, f"{pre}weight", opt("bias"))
        if isinstance(mod, nn.modules.conv._ConvNd):
            if mod.padding_mode != "zeros" and mod.transposed:
                raise _Unsupported("transposed convolution with non-zero padding mode")
            return self.conv(
                x, f"{pre}weight", opt("bias"), groups=mod.groups, stride=mod.stride, transposed=mod.transposed
            )
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return self.norm(
                x,
                NodeType.BATCHNORM,
                mod.num_features,
                opt("weight"),
                opt("bias"),
                opt("running_mean"),
                opt("running_var"),
                channel_first=True,
            )
        if isinstance(mod, nn.modules.instancenorm._InstanceNorm):
            return self.norm(
                x,
                NodeType.INSTANCENORM,
                mod.num_features,
                opt("weight"),
                opt("bias"),
                opt("running_mean"),
                opt("running_var"),
                channel_first=True,
            )
        if isinstance(mod, nn.LayerNorm):
            if len(mod.normalized_shape) != 1:
                raise _Unsupported(f"LayerNorm over shape {tuple(mod.normalized_shape)}")
            return self.norm(
                x, NodeType.LAYERNORM, mod.normalized_shape[0], opt("weight"), opt("bias"), channel_first=False
            )
        if hasattr(nn, "RMSNorm") and isinstance(mod, nn.RMSNorm):
            if len(mod.normalized_shape) != 1:
                raise _Unsupported(f"RMSNorm over shape {tuple(mod.normalized_shape)}")
            return self.norm(x, NodeType.RMSNORM, mod.normalized_shape[0], opt("weight"), None, channel_first=False)
        if isinstance(mod, nn.GroupNorm):
            return self.norm(
                x,
                NodeType.GROUPNORM,
                mod.num_channels,
                opt("weight"),
                opt("bias"),
                channel_first=True,
                groups=mod.num_groups,
            )
        if isinstance(mod, nn.Embedding):
            return self.embedding(x, f"{pre}weight")
        if isinstance(mod, nn.MultiheadAttention):
            q = _arg(args, kwargs, 0, "query")
            k = _arg(args, kwargs, 1, "key")
            v = _arg(args, kwargs, 2, "value")
            return self.attention(mod, name, q, k, v)
        if isinstance(mod, nn.TransformerEncoderLayer):
            return self.encoder_layer(mod, name, _arg(args, kwargs, 0, "src"))
        if isinstance(mod, nn.TransformerEncoder):
            h = _arg(args, kwargs, 0, "src")
            for i, layer in enumerate(mod.layers):
                h = self.encoder_layer(layer, f"{pre}layers.{i}", h)
            if mod.norm is not None:
                h = self.call_layer(mod.norm, f"{pre}norm", [h], {})
            return h
        if isinstance(mod, nn.PReLU):
            xa = x if isinstance(x, _Act) else self.act(x, mod.num_parameters, 1, None)
            return self.param_op(xa, _Param(f"{pre}weight"), "mul")
        if isinstance(mod, nn.Flatten):
            return self.flatten(x, mod.start_dim, mod.end_dim)
        if isinstance(mod, _ACTIVATION_MODULES):
            if getattr(mod, "return_indices", False):
                return _Tuple((x, FREE))
            return x
        kind = "layer" if any(True for _ in mod.parameters(recurse=False)) else "operation"
        raise _Unsupported(f"unsupported {kind} {type(mod).__name__}")

    # ------------------------------------------------------------------ shape operations

    def flatten(self, x: Any, start: int = 0, end: int = -1) -> Any:
        if not isinstance(x, _Act):
            return x
        if x.fdim is None:
            return x
        r = x.rank
        if r is not None:
            s, e, f = start % r, end % r, x.fdim % r
            if s == e:
                return x
            new_rank = r - (e - s)
            if s <= f <= e:
                if x.flat is not None:
                    raise _Unsupported("flattening an already flattened feature map")
                layout = "major" if f == s else ("minor" if f == e else None)
                if layout is None:
                    raise _Unsupported("flattening with the features in the middle")
                return _Act(x.segs, s, new_rank, layout)
            if f > e:
                return _Act(x.segs, f - (e - s), new_rank, x.flat)
            return _Act(x.segs, f, new_rank, x.flat)
        f = x.fdim
        if f >= 0:
            if start > f:
                return _Act(x.segs, f, None, x.flat)
            if start == f:
                if x.flat is not None:
                    raise _Unsupported("flattening an already flattened feature map")
                return _Act(x.segs, f, None if end != -1 else f + 1, "major")
            if 0 <= end < f:
                return _Act(x.segs, f - (end - start), None, x.flat)
            raise _Unsupported("flattening across the feature dimension of a tensor of unknown rank")
        # negative fdim, unknown rank
        if end == -1 and f == -1 and start >= 0:
            if x.flat is not None:
                raise _Unsupported("flattening an already flattened feature map")
            return _Act(x.segs, start, start + 1, "minor")
        if end >= 0 or end < f:
            return _Act(x.segs, f, None, x.flat)
        raise _Unsupported("flattening across the feature dimension of a tensor of unknown rank")

    def reshape(self, x: Any, shape: Sequence[Any]) -> Any:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        if not isinstance(x, _Act):
            return x
        if len(shape) == 2 and _as_int(shape[1]) == -1:
            return self.flatten(x, 1, -1)
        if len(shape) == 1:
            return self.flatten(x, 0, -1)
        new_rank = len(shape)
        if x.fdim is None:
            return _Act(x.segs, None, new_rank, x.flat)
        if x.rank is not None and new_rank == x.rank:
            return x
        last = _as_int(shape[-1])
        if x.flat is None and (x.fdim == -1 or (x.rank is not None and x.fdim % x.rank == x.rank - 1)):
            if last == x.size or last is None or last == -1:
                return _Act(x.segs, -1, new_rank, None)
        if x.fdim >= 0 and x.fdim < new_rank and x.flat is None:
            return _Act(x.segs, x.fdim, new_rank, None)
        raise _Unsupported(f"reshape to {len(shape)} dimensions moves the features")

    def transpose(self, x: Any, a: int, b: int) -> Any:
        if not isinstance(x, _Act) or x.fdim is None:
            return x
        sa, sb = self.same_dim(x, a), self.same_dim(x, b)
        if sa:
            other = b
        elif sb:
            other = a
        else:
            return x
        if x.rank is not None:
            other %= x.rank
        elif (other >= 0) != (x.fdim >= 0):
            raise _Unsupported("transpose of a tensor of unknown rank")
        return _Act(x.segs, other, x.rank, x.flat)

    def permute(self, x: Any, dims: Sequence[Any]) -> Any:
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if not isinstance(x, _Act) or x.fdim is None:
            return x
        r = len(dims)
        norm = [int(d) % r for d in dims]
        return _Act(x.segs, norm.index(x.fdim % r), r, x.flat)

    def squeeze(self, x: Any, dim: Any) -> Any:
        if not isinstance(x, _Act) or x.fdim is None:
            return x
        if dim is None:
            if x.size == 1 and x.flat is None:
                return _Act(x.segs, None, None, None)
            return _Act(x.segs, x.fdim if x.fdim < 0 else x.fdim, None, x.flat)
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        f, r = x.fdim, x.rank
        for d in dims:
            same = self.same_dim(_Act(x.segs, f, r), d)
            if same:
                if x.size == 1 and x.flat is None:
                    return _Act(x.segs, None, None if r is None else r - 1, None)
                continue  # squeezing a dimension of size > 1 is a no-op
            if r is not None:
                if d % r < f % r:
                    f = f % r - 1
                r -= 1
            elif f >= 0 and d >= 0 and d < f:
                f -= 1
        return _Act(x.segs, f, r, x.flat)

    def unsqueeze(self, x: Any, dim: int) -> Any:
        if not isinstance(x, _Act) or x.fdim is None:
            return x
        f, r = x.fdim, x.rank
        if r is not None:
            d = dim % (r + 1)
            fp = f % r
            return _Act(x.segs, fp + 1 if d <= fp else fp, r + 1, x.flat)
        if f >= 0 and dim >= 0:
            return _Act(x.segs, f + 1 if dim <= f else f, None, x.flat)
        if f < 0 and dim < 0:
            return _Act(x.segs, f - 1 if dim >= f else f, None, x.flat)
        return _Act(x.segs, f, None, x.flat)

    def reduce(self, x: Any, dim: Any, keepdim: bool) -> Any:
        if not isinstance(x, _Act):
            return FREE if not isinstance(x, (_Param, _Lazy)) else x
        if dim is None or x.fdim is None:
            return FREE
        dims = list(dim) if isinstance(dim, (tuple, list)) else [dim]
        if any(self.same_dim(x, int(d)) for d in dims):
            return FREE
        if keepdim:
            return x
        f, r = x.fdim, x.rank
        if r is not None:
            fp = f % r
            f = fp - sum(1 for d in dims if int(d) % r < fp)
            return _Act(x.segs, f, r - len(dims), x.flat)
        if f >= 0:
            f -= sum(1 for d in dims if 0 <= int(d) < f)
        return _Act(x.segs, f, None, x.flat)

    def slice_segs(self, segs: tuple[Seg, ...], sel: slice) -> tuple[Seg, ...]:
        total = sum(hi - lo for _, lo, hi in segs)
        start, stop, step = sel.indices(total)
        if step != 1:
            raise _Unsupported("strided slicing of features")
        out = []
        pos = 0
        for s, lo, hi in segs:
            n = hi - lo
            a, b = max(start - pos, 0), min(stop - pos, n)
            if a < b:
                out.append((s, lo + a, lo + b))
            pos += n
        if not out:
            raise _Unsupported("empty feature slice")
        return tuple(out)

    def getitem(self, x: Any, idx: Any) -> Any:
        if isinstance(x, _Tuple):
            i = _as_int(idx)
            if i is None:
                raise _Unsupported("non-constant index into a tuple of activations")
            return x.items[i]
        if isinstance(x, _Repeat):
            return x.item
        if isinstance(x, (list, tuple)):
            i = _as_int(idx)
            return x[i] if i is not None else FREE
        if isinstance(x, (_Param, _Lazy)):
            return x
        if not isinstance(x, _Act):
            return FREE
        if _contains(idx, (_Act, _Lazy)):
            raise _Unsupported("indexing with an activation")
        items = idx if isinstance(idx, tuple) else (idx,)
        if x.fdim is None:
            return x
        if sum(1 for i in items if i is Ellipsis) > 1:
            raise _Unsupported("indexing with several ellipses")
        if Ellipsis in items:
            k = items.index(Ellipsis)
            pre, post = list(items[:k]), list(items[k + 1 :])
        else:
            pre, post = list(items), []
        r = x.rank
        f = x.fdim
        fs = f if f >= 0 else (r + f if r is not None else None)  # position from the start
        fe = f if f < 0 else (f - r if r is not None else None)  # position from the end
        segs, new_f, removed_fdim = x.segs, f, False
        # leading items
        d = 0
        shift = 0
        for item in pre:
            if item is None:
                if fs is not None and d <= fs:
                    shift += 1
                continue
            if fs is not None and d == fs:
                if isinstance(item, slice):
                    if item != slice(None):
                        if x.flat is not None:
                            raise _Unsupported("slicing flattened features")
                        segs = self.slice_segs(segs, item)
                elif _as_int(item) is not None:
                    segs = self.slice_segs(segs, slice(_as_int(item), _as_int(item) + 1 or None))
                    removed_fdim = True
                else:
                    raise _Unsupported("advanced indexing of the feature dimension")
            elif fs is not None and d < fs and not isinstance(item, slice):
                shift -= 1
            d += 1
        # trailing items (after an ellipsis), counted from the end
        d = -1
        for item in reversed(post):
            if item is None:
                if fe is not None and d >= fe:
                    pass
                continue
            if fe is not None and d == fe:
                if isinstance(item, slice):
                    if item != slice(None):
                        if x.flat is not None:
                            raise _Unsupported("slicing flattened features")
                        segs = self.slice_segs(segs, item)
                elif _as_int(item) is not None:
                    segs = self.slice_segs(segs, slice(_as_int(item), _as_int(item) + 1 or None))
                    removed_fdim = True
                else:
                    raise _Unsupported("advanced indexing of the feature dimension")
            d -= 1
        if removed_fdim:
            return _Act(segs, None, None, None)
        n_removed = sum(1 for i in items if i is not None and i is not Ellipsis and not isinstance(i, slice))
        n_added = sum(1 for i in items if i is None)
        new_rank = None if r is None else r - n_removed + n_added
        if f >= 0:
            new_f = f + shift
        else:
            new_f = f
            if post:
                new_f = f - sum(1 for i in post if i is None)
        return _Act(segs, new_f, new_rank, x.flat)

    def split(self, x: Any, size: Any, dim: int, chunk: bool) -> Any:
        if not isinstance(x, _Act):
            return _Repeat(x)
        if not self.same_dim(x, dim):
            return _Repeat(x)
        if x.flat is not None:
            raise _Unsupported("splitting flattened features")
        n = x.size
        if chunk:
            c = int(size)
            step = -(-n // c)
            sizes = [min(step, n - i) for i in range(0, n, step)]
        elif isinstance(size, int):
            sizes = [min(size, n - i) for i in range(0, n, size)]
        else:
            sizes = [int(s) for s in size]
        out, pos = [], 0
        for s in sizes:
            out.append(_Act(self.slice_segs(x.segs, slice(pos, pos + s)), x.fdim, x.rank))
            pos += s
        return _Tuple(tuple(out))

    def cat(self, items: Sequence[Any], dim: int) -> Any:
        acts = [v for v in items if isinstance(v, _Act)]
        params = [v for v in items if isinstance(v, _Param)]
        if any(isinstance(v, _Lazy) for v in items):
            if acts or params:
                raise _Unsupported("concatenating a network input with activations")
            return next(v for v in items if isinstance(v, _Lazy))
        if not acts:
            return params[0] if params else FREE
        a0 = acts[0]
        is_f = self.same_dim(a0, dim)
        if is_f is None:
            is_f = not all(a.segs == a0.segs for a in acts) and not params
        if is_f:
            if params or len(acts) != len(items):
                raise _Unsupported("concatenating activations with non-activations along the features")
            if any(a.flat is not None for a in acts):
                raise _Unsupported("concatenating flattened feature maps")
            segs = tuple(s for a in acts for s in a.segs)
            return _Act(segs, a0.fdim, a0.rank)
        base = a0
        for a in acts[1:]:
            base = self.merge(base, a, "cat")
        for p in params:
            base = self.param_op(base, p, "add")
        return base

    # ------------------------------------------------------------------ elementwise

    def binary(self, op: str, a: Any, b: Any) -> Any:
        if op == "matmul":
            if isinstance(a, (_Act, _Lazy)) and isinstance(b, _Param):
                return self.linear(a, b.name, None, transposed=not b.transposed)
            if isinstance(a, (_Act, _Lazy)) or isinstance(b, (_Act, _Lazy)):
                raise _Unsupported("matrix product of activations (hand-written attention?)")
            return a if isinstance(a, _Param) else (b if isinstance(b, _Param) else FREE)
        if isinstance(a, _Lazy) and isinstance(b, _Act):
            a = self.act(a, b.size, b.fdim if b.fdim is not None else -1, b.rank)
        if isinstance(b, _Lazy) and isinstance(a, _Act):
            b = self.act(b, a.size, a.fdim if a.fdim is not None else -1, a.rank)
        for lazy, other in ((a, b), (b, a)):
            if isinstance(lazy, _Lazy) and isinstance(other, _Param):
                t = self.tensor(other.name)
                if t.dim() == 0 or t.numel() == 1:
                    return lazy
                act = self.act(lazy, t.shape[-1], -1, t.dim() if t.dim() >= 2 else None)
                if lazy is a:
                    a = act
                else:
                    b = act
        if isinstance(a, _Act) and isinstance(b, _Act):
            return self.merge(a, b, op if op in ("add", "sub") else "mul")
        if isinstance(a, _Act) and isinstance(b, _Param):
            return self.param_op(a, b, "mul" if op in ("mul", "div") else op)
        if isinstance(a, _Param) and isinstance(b, _Act):
            return self.param_op(b, a, "mul" if op in ("mul", "div") else op, reverse=True)
        for v in (a, b):
            if isinstance(v, (_Act, _Lazy)):
                return v
        for v in (a, b):
            if isinstance(v, _Param):
                return v
        return FREE

    # ------------------------------------------------------------------ interpretation

    def run_graph(self, graph: fx.Graph) -> None:
        env: dict[fx.Node, Any] = {}
        outputs: Any = None
        for node in graph.nodes:
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            if node.op == "placeholder":
                concrete = node.args and (node.args[0] is None or isinstance(node.args[0], (bool, int, float, str)))
                env[node] = FREE if concrete else _Lazy(str(node.target))
            elif node.op == "get_attr":
                target = str(node.target)
                env[node] = _Param(target) if target in self.tensors else FREE
            elif node.op == "call_module":
                env[node] = self.call_layer(self.root.get_submodule(str(node.target)), str(node.target), args, kwargs)
            elif node.op == "call_function":
                env[node] = self.call_function(node.target, args, kwargs)
            elif node.op == "call_method":
                env[node] = self.call_method(str(node.target), args, kwargs)
            elif node.op == "output":
                outputs = args[0]
        self.finish_outputs(outputs)

    def run_leaf_root(self) -> None:
        mod = self.root
        if isinstance(mod, nn.MultiheadAttention):
            out = self.call_layer(mod, "", [_Lazy("query"), _Lazy("key"), _Lazy("value")], {})
        else:
            out = self.call_layer(mod, "", [_Lazy("input")], {})
        self.finish_outputs(out)

    def finish_outputs(self, outputs: Any) -> None:
        acts: list[_Act] = []

        def walk(v: Any) -> None:
            if isinstance(v, _Act):
                acts.append(v)
            elif isinstance(v, _Tuple):
                for i in v.items:
                    walk(i)
            elif isinstance(v, _Repeat):
                walk(v.item)
            elif isinstance(v, (list, tuple)):
                for i in v:
                    walk(i)
            elif isinstance(v, dict):
                for i in v.values():
                    walk(i)

        walk(outputs)
        if not acts:
            raise _Unsupported("no traced neuron reaches the output")
        for a in acts:
            nodes = self.nodes(a.segs)
            self.io_updates.append((nodes, torch.arange(nodes.numel(), dtype=torch.float32)))
            self.sym.frozen.update(s for s, _, _ in a.segs)

    def call_function(self, fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else None
        if fn is operator.getitem:
            return self.getitem(args[0], args[1])
        if fn is builtins.getattr:
            return self.getattr(args[0], args[1])
        if fn in _ADD:
            return self.binary("add", args[0], args[1])
        if fn in _SUB:
            return self.binary("sub", args[0], args[1])
        if fn in _MUL:
            return self.binary("mul", args[0], args[1])
        if fn in _DIV:
            return self.binary("div", args[0], args[1])
        if fn in _MATMUL:
            return self.binary("matmul", args[0], args[1])
        if fn in _POW:
            if isinstance(args[1], (_Act, _Lazy)):
                raise _Unsupported("power with an activation exponent")
            return x
        if fn in _UNARY_FUNCS:
            if fn in (F.max_pool1d, F.max_pool2d, F.max_pool3d) and kwargs.get("return_indices"):
                return _Tuple((x, FREE))
            return x
        if fn in _REDUCE:
            return self.reduce(x, _arg(args, kwargs, 1, "dim"), bool(_arg(args, kwargs, 2, "keepdim", False)))
        if fn is torch.flatten:
            return self.flatten(x, _arg(args, kwargs, 1, "start_dim", 0), _arg(args, kwargs, 2, "end_dim", -1))
        if fn is torch.reshape:
            return self.reshape(x, _arg(args, kwargs, 1, "shape"))
        if fn is torch.transpose:
            return self.transpose(x, _arg(args, kwargs, 1, "dim0"), _arg(args, kwargs, 2, "dim1"))
        if fn is torch.permute:
            return self.permute(x, _arg(args, kwargs, 1, "dims"))
        if fn is torch.squeeze:
            return self.squeeze(x, _arg(args, kwargs, 1, "dim"))
        if fn is torch.unsqueeze:
            return self.unsqueeze(x, _arg(args, kwargs, 1, "dim"))
        if fn in (torch.cat, torch.concat, torch.concatenate):
            return self.cat(args[0], _arg(args, kwargs, 1, "dim", 0))
        if fn is torch.stack:
            items = args[0]
            dim = _arg(args, kwargs, 1, "dim", 0)
            acts = [v for v in items if isinstance(v, _Act)]
            if not acts:
                return self.cat(items, dim)
            base = acts[0]
            for a in acts[1:]:
                base = self.merge(base, a, "cat")
            for p in (v for v in items if isinstance(v, _Param)):
                base = self.param_op(base, p, "add")
            return self.unsqueeze(base, dim)
        if fn in (torch.split, torch.chunk):
            return self.split(x, args[1], _arg(args, kwargs, 2, "dim", 0), fn is torch.chunk)
        if fn in _CREATE:
            return FREE
        if fn is F.linear:
            w = _arg(args, kwargs, 1, "weight")
            b = _arg(args, kwargs, 2, "bias")
            if not isinstance(w, _Param):
                raise _Unsupported("F.linear with a computed weight")
            return self.linear(x, w.name, b.name if isinstance(b, _Param) else None, transposed=w.transposed)
        if fn in (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
            w = _arg(args, kwargs, 1, "weight")
            b = _arg(args, kwargs, 2, "bias")
            transposed = fn in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
            groups = _arg(args, kwargs, 6 if transposed else 6, "groups", 1)
            if not isinstance(w, _Param) or w.transposed:
                raise _Unsupported("convolution with a computed weight")
            return self.conv(
                x,
                w.name,
                b.name if isinstance(b, _Param) else None,
                groups=groups if isinstance(groups, int) else 1,
                stride=_arg(args, kwargs, 3, "stride", 1),
                transposed=transposed,
            )
        if fn is F.layer_norm:
            shape = _arg(args, kwargs, 1, "normalized_shape")
            w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
            shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
            if len(shape) != 1 or not isinstance(shape[0], int):
                raise _Unsupported("layer_norm over several dimensions")
            return self.norm(
                x,
                NodeType.LAYERNORM,
                shape[0],
                w.name if isinstance(w, _Param) else None,
                b.name if isinstance(b, _Param) else None,
                channel_first=False,
            )
        if hasattr(F, "rms_norm") and fn is F.rms_norm:
            shape = _arg(args, kwargs, 1, "normalized_shape")
            w = _arg(args, kwargs, 2, "weight")
            shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
            if len(shape) != 1 or not isinstance(shape[0], int):
                raise _Unsupported("rms_norm over several dimensions")
            return self.norm(
                x, NodeType.RMSNORM, shape[0], w.name if isinstance(w, _Param) else None, None, channel_first=False
            )
        if fn is F.group_norm:
            g = _arg(args, kwargs, 1, "num_groups")
            w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
            if not isinstance(w, _Param):
                raise _Unsupported("group_norm without a weight parameter")
            c = self.tensor(w.name).numel()
            return self.norm(
                x,
                NodeType.GROUPNORM,
                c,
                w.name,
                b.name if isinstance(b, _Param) else None,
                channel_first=True,
                groups=int(g),
            )
        if fn in (F.batch_norm, F.instance_norm):
            rm, rv = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
            w, b = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
            ref = next((v for v in (w, b, rm, rv) if isinstance(v, _Param)), None)
            if ref is None:
                raise _Unsupported("batch/instance norm without parameters")
            c = self.tensor(ref.name).numel()
            ntype = NodeType.BATCHNORM if fn is F.batch_norm else NodeType.INSTANCENORM

            def nm(v: Any) -> str | None:
                return v.name if isinstance(v, _Param) else None

            return self.norm(x, ntype, c, nm(w), nm(b), nm(rm), nm(rv), channel_first=True)
        if fn is F.embedding:
            w = _arg(args, kwargs, 1, "weight")
            if not isinstance(w, _Param):
                raise _Unsupported("embedding with a computed table")
            return self.embedding(x, w.name)
        name = getattr(fn, "__name__", repr(fn))
        if name in _PASS_THROUGH_NAMES:
            return x
        every = list(args) + list(kwargs.values())
        if not _contains(every, (_Act, _Lazy)):
            p = _first(every, _Param)
            return p if p is not None else FREE
        raise _Unsupported(f"unsupported function {name}")

    def getattr(self, x: Any, attr: str) -> Any:
        if attr in ("T", "mT"):
            if isinstance(x, _Param):
                return _Param(x.name, not x.transposed)
            if isinstance(x, _Act):
                return self.transpose(x, -2, -1)
            return x
        return FREE

    def call_method(self, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        x = args[0]
        if name in _ADD:
            return self.binary("add", x, args[1])
        if name in _SUB:
            return self.binary("sub", x, args[1])
        if name in _MUL:
            return self.binary("mul", x, args[1])
        if name in _DIV:
            return self.binary("div", x, args[1])
        if name in _MATMUL:
            return self.binary("matmul", x, args[1])
        if name in _POW:
            if isinstance(args[1], (_Act, _Lazy)):
                raise _Unsupported("power with an activation exponent")
            return x
        if name in ("size", "dim", "numel", "nelement", "stride", "data_ptr", "is_contiguous"):
            return FREE
        if name in _UNARY_METHODS:
            return x
        if name in _REDUCE_METHODS:
            return self.reduce(x, _arg(args, kwargs, 1, "dim"), bool(_arg(args, kwargs, 2, "keepdim", False)))
        if name == "flatten":
            return self.flatten(x, _arg(args, kwargs, 1, "start_dim", 0), _arg(args, kwargs, 2, "end_dim", -1))
        if name in ("view", "reshape"):
            shape = list(args[1:]) or [kwargs.get("shape", kwargs.get("size"))]
            if isinstance(x, _Param):
                return x
            return self.reshape(x, shape)
        if name in ("transpose", "swapaxes", "swapdims"):
            if isinstance(x, _Param):
                return _Param(x.name, not x.transposed)
            return self.transpose(x, _arg(args, kwargs, 1, "dim0"), _arg(args, kwargs, 2, "dim1"))
        if name == "t":
            if isinstance(x, _Param):
                return _Param(x.name, not x.transposed)
            return self.transpose(x, 0, 1)
        if name == "permute":
            if isinstance(x, _Param):
                return x
            return self.permute(x, list(args[1:]) or kwargs.get("dims"))
        if name == "squeeze":
            return self.squeeze(x, _arg(args, kwargs, 1, "dim"))
        if name == "unsqueeze":
            return self.unsqueeze(x, _arg(args, kwargs, 1, "dim"))
        if name in ("expand", "expand_as", "repeat", "broadcast_to"):
            return x
        if name in ("split", "chunk"):
            return self.split(x, args[1], _arg(args, kwargs, 2, "dim", 0), name == "chunk")
        if name == "unbind":
            return _Repeat(self.reduce(x, _arg(args, kwargs, 1, "dim", 0), False))
        every = list(args) + list(kwargs.values())
        if not _contains(every, (_Act, _Lazy)):
            p = _first(every, _Param)
            return p if p is not None else FREE
        raise _Unsupported(f"unsupported method .{name}()")

    # ------------------------------------------------------------------ result

    def topology(self, signature: str) -> GraphTopology:
        if not self.sets:
            raise _Unsupported("no layers found")
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


def _concrete_defaults(module: nn.Module) -> dict[str, Any] | None:
    """``forward`` arguments with a default value, traced as that constant (``if mask is not None``, flags)."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    out = {
        name: p.default
        for name, p in sig.parameters.items()
        if p.default is not inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and (p.default is None or isinstance(p.default, (bool, int, float, str)))
    }
    return out or None


def build_topology(module: nn.Module, options: GraphOptions, signature: str) -> GraphTopology:
    """Trace ``module`` and build its topology, or the statistics fallback (never raises for user modules)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            builder = _Builder(module, options)
            if _leaf_root(module):
                builder.run_leaf_root()
            else:
                graph = _Tracer().trace(module, concrete_args=_concrete_defaults(module))
                builder.run_graph(graph)
            return builder.topology(signature)
    except _Unsupported as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - user code may raise anything while being traced
        reason = f"cannot trace: {type(exc).__name__}: {exc}"
    reason = reason.splitlines()[0][:300] if reason else "unsupported"
    return fallback_topology(module, options, signature, reason)
