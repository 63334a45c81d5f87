"""Elementwise semantics: how two values combine (residual sums, products, parameter operations, concatenation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning_fms.weights.schema import NV, EdgeType, NodeType
from lightning_fms.weights.specs import NodeValueSpec
from lightning_fms.weights.tracing.emitter import GraphEmitter
from lightning_fms.weights.tracing.layers import linear
from lightning_fms.weights.tracing.shapes import same_dim, unsqueeze
from lightning_fms.weights.tracing.values import FREE, Activation, LazyInput, ParamRef, Unsupported


def merge(g: GraphEmitter, a: Activation, b: Activation, op: str) -> Activation:
    """Combine two activations elementwise (``add``, ``sub``, ``mul``) or along a non-feature dimension (``cat``).

    Args:
        g: The graph being emitted.
        a: The first operand.
        b: The second operand.
        op: ``"add"``, ``"sub"``, ``"mul"`` (any other product) or ``"cat"``.

    Returns:
        ``a`` when both carry the same neurons (``x + x``), the other when one carries a single feature
        (broadcast), else a new set tied to both by identity edges.
    """
    if a.segs == b.segs and a.flat == b.flat and op != "sub":
        return a
    if a.flat is not None or b.flat is not None:
        raise Unsupported(f"elementwise {op} of flattened feature maps")
    if a.size != b.size:
        if b.size == 1 and op != "cat":
            return a
        if a.size == 1 and op != "cat":
            return b
        raise Unsupported(f"elementwise {op} of {a.size} and {b.size} features")
    ntype = {"add": NodeType.ADD, "sub": NodeType.ADD, "cat": NodeType.MERGE}.get(op, NodeType.MUL)
    etype = EdgeType.MUL if ntype == NodeType.MUL else EdgeType.RESIDUAL
    out = g.new_set(a.size, ntype, g.depth(a, b))
    g.identity_edges(a, out, etype)
    g.identity_edges(b, out, etype, -1.0 if op == "sub" else 1.0)
    fdim, rank = (a.fdim, a.rank) if a.rank is not None or b.rank is None else (b.fdim, b.rank)
    return Activation(((out, 0, a.size),), fdim, rank)


def param_op(
    g: GraphEmitter, x: Activation, p: ParamRef, op: str, *, reverse: bool = False, feature_axis: int | None = None
) -> Activation:
    """Apply a parameter tensor to an activation (``x + p``, ``x * p``, ...): a new set tied to ``x``.

    A parameter with one value per feature becomes a node value (``bias`` or ``gamma``); any other tensor gives
    each node the statistics of its slice along the feature axis (positional embeddings).

    Args:
        g: The graph being emitted.
        x: The activation.
        p: The parameter.
        op: ``"add"``, ``"sub"`` or ``"mul"``.
        reverse: Whether the parameter is the left operand (``p - x``).
        feature_axis: The parameter's axis along the features when the operation says so (not broadcasting from
            the last dimension: a ``PReLU`` weight applies to the channels); found by broadcasting when ``None``.

    Returns:
        The result activation.
    """
    t = g.tensor(p.name)
    n = x.size
    if x.flat is not None:
        raise Unsupported(f"parameter {p.name} applied to a flattened feature map")
    axis: int | None = feature_axis
    if axis is not None and (t.dim() <= axis or t.shape[axis] != n):
        raise Unsupported(f"parameter {p.name} {tuple(t.shape)} does not hold one value per feature")
    if axis is None and x.fdim is not None and t.dim() > 0:
        if x.rank is not None:
            cand = t.dim() - (x.rank - x.fdim % x.rank)
        elif x.fdim < 0:
            cand = t.dim() + x.fdim
        else:
            cand = x.fdim - 1 if t.dim() == 1 and x.fdim == 1 else None
        if cand is not None and 0 <= cand < t.dim() and t.shape[cand] == n:
            axis = cand
    if t.numel() > 1 and axis is None and any(s == n for s in t.shape) and t.dim() == 1:
        raise Unsupported(f"cannot align parameter {p.name} {tuple(t.shape)} with the features")
    vector = axis is not None and t.numel() == n
    column = None
    if vector and op in ("add", "sub"):
        column = "bias"
    elif vector and op == "mul":
        column = "gamma"
    out = g.new_set(
        n,
        NodeType.PARAM_OP,
        g.depth(x),
        has_bias=column == "bias",
        has_affine=column == "gamma",
        has_stats=column is None,
        log_numel=math.log1p(t.numel()),
    )
    g.identity_edges(x, out, EdgeType.PARAM_OP, -1.0 if (op == "sub" and reverse) else 1.0)
    nodes = g.set_nodes(out)
    if column is not None:
        scale = -1.0 if (op == "sub" and not reverse) else 1.0
        g.node_specs.append(NodeValueSpec(p.name, nodes, "vector", column=NV[column], scale=scale))
    else:
        g.node_specs.append(NodeValueSpec(p.name, nodes, "colstats", axis=axis))
    g.used.add(p.name)
    if axis is not None:
        g.sym.param_axes.append((p.name, axis, ((out, 0, n),), None, 1, None))
    return Activation(((out, 0, n),), x.fdim, x.rank)


def binary(g: GraphEmitter, op: str, a: Any, b: Any) -> Any:
    """An elementwise binary operation or matrix product of two abstract values.

    Args:
        g: The graph being emitted.
        op: ``"add"``, ``"sub"``, ``"mul"``, ``"div"`` or ``"matmul"``.
        a: The left operand.
        b: The right operand.

    Returns:
        The result (``x @ W`` is a linear layer; a product of two activations is unsupported).
    """
    if op == "matmul":
        if isinstance(a, (Activation, LazyInput)) and isinstance(b, ParamRef):
            return linear(g, a, b.name, None, transposed=not b.transposed)
        if isinstance(a, (Activation, LazyInput)) or isinstance(b, (Activation, LazyInput)):
            raise Unsupported("matrix product of activations (hand-written attention?)")
        return a if isinstance(a, ParamRef) else (b if isinstance(b, ParamRef) else FREE)
    if isinstance(a, LazyInput) and isinstance(b, Activation):
        a = g.act(a, b.size, b.fdim if b.fdim is not None else -1, b.rank)
    if isinstance(b, LazyInput) and isinstance(a, Activation):
        b = g.act(b, a.size, a.fdim if a.fdim is not None else -1, a.rank)
    for lazy, other in ((a, b), (b, a)):
        if isinstance(lazy, LazyInput) and isinstance(other, ParamRef):
            t = g.tensor(other.name)
            if t.dim() == 0 or t.numel() == 1:
                return lazy
            act = g.act(lazy, t.shape[-1], -1, t.dim() if t.dim() >= 2 else None)
            if lazy is a:
                a = act
            else:
                b = act
    if isinstance(a, Activation) and isinstance(b, Activation):
        return merge(g, a, b, op if op in ("add", "sub") else "mul")
    if isinstance(a, Activation) and isinstance(b, ParamRef):
        return param_op(g, a, b, "mul" if op in ("mul", "div") else op)
    if isinstance(a, ParamRef) and isinstance(b, Activation):
        return param_op(g, b, a, "mul" if op in ("mul", "div") else op, reverse=True)
    for v in (a, b):
        if isinstance(v, (Activation, LazyInput)):
            return v
    for v in (a, b):
        if isinstance(v, ParamRef):
            return v
    return FREE


def cat(g: GraphEmitter, items: Sequence[Any], dim: int) -> Any:
    """``torch.cat(items, dim)``: segments concatenate along the features; along another dimension they merge.

    Args:
        g: The graph being emitted.
        items: The concatenated values.
        dim: The dimension.

    Returns:
        The result.
    """
    acts = [v for v in items if isinstance(v, Activation)]
    params = [v for v in items if isinstance(v, ParamRef)]
    if any(isinstance(v, LazyInput) for v in items):
        if acts or params:
            raise Unsupported("concatenating a network input with activations")
        return next(v for v in items if isinstance(v, LazyInput))
    if not acts:
        return params[0] if params else FREE
    a0 = acts[0]
    is_f = same_dim(a0, dim)
    if is_f is None:
        is_f = not all(a.segs == a0.segs for a in acts) and not params
    if is_f:
        if params or len(acts) != len(items):
            raise Unsupported("concatenating activations with non-activations along the features")
        if any(a.flat is not None for a in acts):
            raise Unsupported("concatenating flattened feature maps")
        segs = tuple(s for a in acts for s in a.segs)
        return Activation(segs, a0.fdim, a0.rank)
    base = a0
    for a in acts[1:]:
        base = merge(g, base, a, "cat")
    for p in params:
        base = param_op(g, base, p, "add")
    return base


def stack(g: GraphEmitter, items: Sequence[Any], dim: int) -> Any:
    """``torch.stack(items, dim)``: the activations merge (the features stay) and a dimension is inserted.

    Args:
        g: The graph being emitted.
        items: The stacked values.
        dim: The new dimension.

    Returns:
        The result.
    """
    acts = [v for v in items if isinstance(v, Activation)]
    if not acts:
        return cat(g, items, dim)
    base = acts[0]
    for a in acts[1:]:
        base = merge(g, base, a, "cat")
    for p in (v for v in items if isinstance(v, ParamRef)):
        base = param_op(g, base, p, "add")
    return unsqueeze(base, dim)


def power(x: Any, exponent: Any) -> Any:
    """``x ** exponent``: the neurons stay; an exponent carrying neurons is unsupported."""
    if isinstance(exponent, (Activation, LazyInput)):
        raise Unsupported("power with an activation exponent")
    return x
