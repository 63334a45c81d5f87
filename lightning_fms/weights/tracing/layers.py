"""Layer semantics: the nodes, edges and symmetries each weight layer emits.

Linear layers, convolutions, normalisations, embeddings and attention; the modules and functions that apply them
are dispatched by :mod:`~lightning_fms.weights.tracing.modules` and :mod:`~lightning_fms.weights.tracing.functions`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_fms.weights.schema import NV, EdgeType, NodeType
from lightning_fms.weights.specs import EdgeValueSpec, NodeValueSpec
from lightning_fms.weights.topology import LayerRecord
from lightning_fms.weights.tracing.emitter import GraphEmitter
from lightning_fms.weights.tracing.shapes import require_channel, require_last
from lightning_fms.weights.tracing.values import FREE, Activation, Unsupported, ValueTuple, kernel_hw


def linear(g: GraphEmitter, x: Any, wname: str, bname: str | None, *, transposed: bool = False) -> Activation:
    """A linear layer ``x @ W.T + b`` (``transposed``: ``x @ W``): one output set, one edge per weight entry.

    A linear layer reading a flattened feature map (``C`` channels x ``k`` positions) gets one edge per
    (channel, output) pair carrying the ``k`` weights.

    Args:
        g: The graph being emitted.
        x: The input (an activation, or a network input sized here).
        wname: The weight, ``[out, in]`` (``transposed``: ``[in, out]``).
        bname: The bias, ``[out]``, or ``None``.
        transposed: Whether the weight is stored ``[in, out]``.

    Returns:
        The output activation (features last).
    """
    w = g.tensor(wname)
    if w.dim() != 2:
        raise Unsupported(f"linear weight {wname} has shape {tuple(w.shape)}")
    in_f, out_f = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
    x = g.act(x, in_f, -1, None)
    require_last(x, f"linear layer {wname}")
    n = x.size
    k = 1
    if x.flat is not None:
        if in_f % n:
            raise Unsupported(f"{wname} reads {in_f} features from {n} flattened channels")
        k = in_f // n
        if transposed and k > 1:
            raise Unsupported("x @ W on a flattened feature map")
    elif in_f != n:
        raise Unsupported(f"{wname} expects {in_f} features, the traced input has {n}")
    if bname is not None and g.tensor(bname).numel() != out_f:
        raise Unsupported(f"bias {bname} does not match {wname}")
    depth = g.depth(x) + 1
    out = g.new_set(out_f, NodeType.LINEAR, depth, has_bias=bname is not None)
    in_nodes, out_nodes = g.nodes(x.segs), g.set_nodes(out)
    src, dst = in_nodes.repeat(out_f), out_nodes.repeat_interleave(n)
    if k > 1:
        spec = EdgeValueSpec(src.numel(), wname, "flat", flat_k=k, flat_layout=x.flat or "major")
        g.add_edges(
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
        g.add_edges(src, dst, spec, EdgeType.LINEAR, depth, fan_in=in_f, dense=(1, out_f, n, in_nodes, out_nodes))
    g.node_vector(bname, out, "bias")
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    g.sym.param_axes.append((wname, out_axis, ((out, 0, out_f),), None, 1, None))
    g.sym.param_axes.append((wname, in_axis, x.segs, x.flat if k > 1 else None, k, None))
    g.layers.append(LayerRecord("linear", wname, bname, x.segs, out, plain=not transposed and k == 1))
    return Activation(((out, 0, out_f),), -1, x.rank)


def conv(
    g: GraphEmitter,
    x: Any,
    wname: str,
    bname: str | None,
    *,
    groups: int = 1,
    stride: Any = 1,
    transposed: bool = False,
) -> Activation:
    """A (transposed, grouped) convolution: one output set, one edge per connected channel pair carrying the kernel.

    Args:
        g: The graph being emitted.
        x: The input (channels in dimension 1).
        wname: The weight, ``[out, in / groups, *k]`` (``transposed``: ``[in, out / groups, *k]``).
        bname: The bias, ``[out]``, or ``None``.
        groups: Convolution groups (grouped convolutions are not permuted).
        stride: The stride (an int or one per spatial dimension; the largest is the feature).
        transposed: Whether it is a transposed convolution.

    Returns:
        The output activation (channels in dimension 1).
    """
    w = g.tensor(wname)
    if w.dim() < 3:
        raise Unsupported(f"convolution weight {wname} has shape {tuple(w.shape)}")
    nd = w.dim() - 2
    groups = int(groups)
    if transposed:
        in_c, og = w.shape[0], w.shape[1]
        out_c, ig = og * groups, in_c // groups
    else:
        out_c, ig = w.shape[0], w.shape[1]
        in_c, og = ig * groups, out_c // groups
    x = g.act(x, in_c, 1, nd + 2)
    require_channel(x, f"convolution {wname}")
    if x.flat is not None or x.size != in_c:
        raise Unsupported(f"{wname} expects {in_c} channels, the traced input has {x.size}")
    if bname is not None and g.tensor(bname).numel() != out_c:
        raise Unsupported(f"bias {bname} does not match {wname}")
    depth = g.depth(x) + 1
    out = g.new_set(out_c, NodeType.CONV, depth, has_bias=bname is not None)
    in_nodes, out_nodes = g.nodes(x.segs), g.set_nodes(out)
    src = in_nodes.view(groups, ig)[torch.arange(out_c) // og].reshape(-1)
    dst = out_nodes.repeat_interleave(ig)
    kind = "transpose" if transposed else "kernel"
    spec = EdgeValueSpec(src.numel(), wname, kind, groups=groups)
    s = stride if isinstance(stride, int) else max(int(v) for v in stride)
    etype = EdgeType.CONV_TRANSPOSE if transposed else EdgeType.CONV
    ksz = tuple(int(v) for v in w.shape[2:])
    g.add_edges(
        src,
        dst,
        spec,
        etype,
        depth,
        kernel=kernel_hw(ksz),
        stride=s,
        fan_in=ig * math.prod(ksz),
        dense=(groups, og, ig, in_nodes, out_nodes),
    )
    g.node_vector(bname, out, "bias")
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    if groups == 1:
        g.sym.param_axes.append((wname, out_axis, ((out, 0, out_c),), None, 1, None))
        g.sym.param_axes.append((wname, in_axis, x.segs, None, 1, None))
    else:
        g.sym.frozen.add(out)
        g.sym.frozen.update(sid for sid, _, _ in x.segs)
    plain = groups == 1 and not transposed
    g.layers.append(LayerRecord("conv", wname, bname, x.segs, out, plain=plain))
    return Activation(((out, 0, out_c),), 1, x.rank if x.rank is not None else nd + 2)


def norm(
    g: GraphEmitter,
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
) -> Activation:
    """A normalisation layer: one node per normalised feature, tied to its input by identity edges.

    Args:
        g: The graph being emitted.
        x: The input.
        ntype: The node type (which normalisation).
        size: Number of normalised features.
        wname: The scale, or ``None``.
        bname: The shift, or ``None``.
        mean_name: The running mean, or ``None``.
        var_name: The running variance, or ``None``.
        channel_first: Features in dimension 1 (batch/instance/group norm) rather than last.
        groups: Number of groups (``GroupNorm``: one extra node per group), or 0.

    Returns:
        The normalised activation (features where they were).
    """
    x = g.act(x, size, 1 if channel_first else -1, None)
    what = f"{ntype.name.lower()} of {size} features"
    if channel_first:
        require_channel(x, what)
    else:
        require_last(x, what)
    if x.flat is not None or x.size != size:
        raise Unsupported(f"{what} applied to {x.size} traced features")
    running = g.options.include_running_stats and mean_name is not None and var_name is not None
    part = None
    if groups:
        part = torch.arange(size) // (size // groups)
    out = g.new_set(
        size,
        ntype,
        g.depth(x),
        part=part,
        num_parts=groups,
        has_bias=False,
        has_affine=wname is not None or bname is not None,
        has_running=running,
    )
    g.identity_edges(x, out, EdgeType.NORM)
    g.node_vector(wname, out, "gamma")
    g.node_vector(bname, out, "beta")
    if running:
        g.node_vector(mean_name, out, "running_mean")
        g.node_vector(var_name, out, "running_var")
    if groups:
        gset = g.new_set(groups, NodeType.NORM_GROUP, g.sets[out].depth, part=torch.arange(groups))
        src = g.set_nodes(gset).repeat_interleave(size // groups)
        spec = EdgeValueSpec(size, None, "const")
        g.add_edges(src, g.set_nodes(out), spec, EdgeType.NORM_GROUP, g.sets[out].depth, head=part)
        g.sym.frozen.update((out, gset))
    return Activation(((out, 0, size),), x.fdim, x.rank)


def embedding(g: GraphEmitter, ids: Any, wname: str) -> Activation:
    """An embedding table read by indices (which carry no neurons): one node per embedding dimension.

    Args:
        g: The graph being emitted.
        ids: The indices.
        wname: The table, ``[vocab, d]``; its columns' statistics become node values.

    Returns:
        The embedded activation (features last).
    """
    if isinstance(ids, Activation):
        raise Unsupported("embedding of an activation")
    w = g.tensor(wname)
    if w.dim() != 2:
        raise Unsupported(f"embedding table {wname} has shape {tuple(w.shape)}")
    d = w.shape[1]
    out = g.new_set(d, NodeType.EMBEDDING, 1, has_stats=True, log_numel=math.log1p(w.numel()))
    g.node_specs.append(NodeValueSpec(wname, g.set_nodes(out), "colstats", axis=1))
    g.used.add(wname)
    g.sym.param_axes.append((wname, 1, ((out, 0, d),), None, 1, None))
    g.layers.append(LayerRecord("embedding", wname, None, (), out, plain=False))
    return Activation(((out, 0, d),), -1, None)


def attention(g: GraphEmitter, mod: nn.MultiheadAttention, name: str, q: Any, k: Any, v: Any) -> ValueTuple:
    """``nn.MultiheadAttention``: query/key/value/output sets, one node per head, in/out projections as edges.

    Args:
        g: The graph being emitted.
        mod: The attention module.
        name: Its qualified name.
        q: The query input.
        k: The key input.
        v: The value input.

    Returns:
        ``(output activation, FREE attention weights)``.
    """
    e, h = mod.embed_dim, mod.num_heads
    hd = e // h
    pre = f"{name}." if name else ""
    q = g.act(q, e, -1, None)
    k = g.act(k, mod.kdim, -1, None)
    v = g.act(v, mod.vdim, -1, None)
    for a, n, what in ((q, e, "query"), (k, mod.kdim, "key"), (v, mod.vdim, "value")):
        require_last(a, f"attention {what}")
        if a.flat is not None or a.size != n:
            raise Unsupported(f"attention {what} has {a.size} features, expected {n}")
    depth = g.depth(q, k, v) + 1
    head = torch.arange(e) // hd
    bias = f"{pre}in_proj_bias" if mod.in_proj_bias is not None else None
    sets = []
    for ntype in (NodeType.ATTN_Q, NodeType.ATTN_K, NodeType.ATTN_V):
        sets.append(g.new_set(e, ntype, depth, part=head, num_parts=h, has_bias=bias is not None))
    qs, ks, vs = sets
    packed = mod._qkv_same_embed_dim
    for i, (a, sid, etype) in enumerate(((q, qs, EdgeType.ATTN_Q), (k, ks, EdgeType.ATTN_K), (v, vs, EdgeType.ATTN_V))):
        wname = f"{pre}in_proj_weight" if packed else f"{pre}{'qkv'[i]}_proj_weight"
        rows = (i * e, (i + 1) * e) if packed else None
        n_in = a.size
        in_nodes, set_nodes = g.nodes(a.segs), g.set_nodes(sid)
        src, dst = in_nodes.repeat(e), set_nodes.repeat_interleave(n_in)
        spec = EdgeValueSpec(src.numel(), wname, "kernel", rows=rows)
        g.tensor(wname)
        g.add_edges(
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
            g.node_vector(bias, sid, "bias", rows=(i * e, (i + 1) * e))
        if packed:
            g.sym.param_axes.append((wname, 1, a.segs, None, 1, (0, i * e, (i + 1) * e)))
        else:
            g.sym.param_axes.append((wname, 1, a.segs, None, 1, None))
            g.sym.param_axes.append((wname, 0, ((sid, 0, e),), None, 1, None))
    qkv = ((qs, 0, e), (ks, 0, e), (vs, 0, e))
    if packed:
        g.sym.param_axes.append((f"{pre}in_proj_weight", 0, qkv, None, 1, None))
    if bias is not None:
        g.sym.param_axes.append((bias, 0, qkv, None, 1, None))
    for extra, sid in ((f"{pre}bias_k", ks), (f"{pre}bias_v", vs)):
        if extra in g.tensors:
            g.node_specs.append(NodeValueSpec(extra, g.set_nodes(sid), "vector", column=NV["beta"]))
            g.sym.param_axes.append((extra, 2, ((sid, 0, e),), None, 1, None))
            g.used.add(extra)
    # query i pairs with key i in the dot product
    const = EdgeValueSpec(e, None, "const")
    g.add_edges(g.set_nodes(qs), g.set_nodes(ks), const, EdgeType.ATTN_QK, depth, head=head)
    g.sym.ties.append((((qs, 0, e),), ks))
    # one node per head: queries and keys of the head feed it, it weighs the head's values
    hs = g.new_set(h, NodeType.ATTN_HEAD, depth, part=torch.arange(h), num_parts=h)
    hn = g.set_nodes(hs)[head]
    for sid in (qs, ks):
        g.add_edges(g.set_nodes(sid), hn, EdgeValueSpec(e, None, "const"), EdgeType.HEAD_IN, depth, head=head)
    g.add_edges(hn, g.set_nodes(vs), EdgeValueSpec(e, None, "const"), EdgeType.HEAD_OUT, depth, head=head)
    g.sym.frozen.add(hs)
    g.sym.attention.append((qs, ks, vs, h))
    # output projection
    ow, ob = f"{pre}out_proj.weight", (f"{pre}out_proj.bias" if mod.out_proj.bias is not None else None)
    out = g.new_set(e, NodeType.ATTN_OUT, depth + 1, has_bias=ob is not None)
    v_nodes, o_nodes = g.set_nodes(vs), g.set_nodes(out)
    src, dst = v_nodes.repeat(e), o_nodes.repeat_interleave(e)
    g.tensor(ow)
    g.add_edges(
        src,
        dst,
        EdgeValueSpec(e * e, ow, "kernel"),
        EdgeType.ATTN_OUT,
        depth + 1,
        fan_in=e,
        head=head.repeat(e),
        dense=(1, e, e, v_nodes, o_nodes),
    )
    g.node_vector(ob, out, "bias")
    g.sym.param_axes.append((ow, 0, ((out, 0, e),), None, 1, None))
    g.sym.param_axes.append((ow, 1, ((vs, 0, e),), None, 1, None))
    g.layers.append(LayerRecord("attention", None, None, q.segs, out, plain=False))
    return ValueTuple((Activation(((out, 0, e),), -1, q.rank), FREE))
