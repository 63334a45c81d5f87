"""Dispatch of functions (fx ``call_function`` nodes): a table from function to its semantics.

:data:`FUNCTION_HANDLERS` maps every recognised function to a handler; a function it does not hold is passed
through if it is one of :data:`~lightning_fms.weights.tracing.ops.PASS_THROUGH_NAMES` (matched by name), ignored if
no argument carries neurons, and :class:`~lightning_fms.weights.tracing.values.Unsupported` otherwise.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lightning_fms.weights.schema import NodeType
from lightning_fms.weights.tracing.elementwise import binary, cat, power, stack
from lightning_fms.weights.tracing.emitter import GraphEmitter
from lightning_fms.weights.tracing.layers import conv, embedding, linear, norm
from lightning_fms.weights.tracing.ops import (
    BINARY_FUNCTIONS,
    CREATE_FUNCTIONS,
    PASS_THROUGH_NAMES,
    POW_FUNCTIONS,
    REDUCE_FUNCTIONS,
    UNARY_FUNCTIONS,
)
from lightning_fms.weights.tracing.shapes import (
    attribute,
    flatten,
    getitem,
    permute,
    reduce,
    reshape,
    split,
    squeeze,
    transpose,
    unsqueeze,
)
from lightning_fms.weights.tracing.values import (
    FREE,
    ParamRef,
    RepeatedValue,
    Unsupported,
    ValueTuple,
    arg,
    value_of_unknown_call,
)

Handler = Callable[[GraphEmitter, Sequence[Any], dict[str, Any]], Any]
"""``handler(g, args, kwargs) -> value`` for abstract arguments of a call."""

_MAX_POOLS = (F.max_pool1d, F.max_pool2d, F.max_pool3d)
_MAX_POOLS_WITH_INDICES = tuple(
    getattr(F, f"{kind}max_pool{d}d_with_indices") for kind in ("", "adaptive_") for d in (1, 2, 3)
)
_CONVS = (F.conv1d, F.conv2d, F.conv3d)
_CONV_TRANSPOSES = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def _first(args: Sequence[Any]) -> Any:
    return args[0] if args else None


def _name(v: Any) -> str | None:
    """The name of a parameter argument, ``None`` for anything else (an optional tensor left out)."""
    return v.name if isinstance(v, ParamRef) else None


def binary_handler(op: str) -> Handler:
    """The handler of the binary operation ``op`` of ``args[0]`` and ``args[1]``."""

    def handle(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        return binary(g, op, args[0], args[1])

    return handle


def _unary(fn: Callable[..., Any]) -> Handler:
    returns_indices = fn in _MAX_POOLS

    def handle(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        x = _first(args)
        if returns_indices and kwargs.get("return_indices"):
            return ValueTuple((x, FREE))
        return x

    return handle


def _with_indices(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """A max pooling that also returns the indices of the maxima (which carry no neurons)."""
    return ValueTuple((_first(args), FREE))


def _items(values: Any) -> Any:
    """The values a ``cat`` or ``stack`` reads: the parts of a split (passed as one value) or a list as given."""
    if isinstance(values, ValueTuple):
        return list(values.items)
    if isinstance(values, RepeatedValue):
        return [values.item]
    return values


def handle_reduce(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """A reduction of ``args[0]`` over ``dim`` (argument 1), ``keepdim`` argument 2."""
    keepdim = bool(arg(args, kwargs, 2, "keepdim", False))
    return reduce(_first(args), arg(args, kwargs, 1, "dim"), keepdim)


def handle_flatten(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``flatten(args[0], start_dim, end_dim)``."""
    start, end = arg(args, kwargs, 1, "start_dim", 0), arg(args, kwargs, 2, "end_dim", -1)
    return flatten(_first(args), start, end)


def _transpose(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    return transpose(_first(args), arg(args, kwargs, 1, "dim0"), arg(args, kwargs, 2, "dim1"))


def split_handler(chunk: bool) -> Handler:
    """The handler of ``split`` (``chunk=False``) or ``chunk`` of ``args[0]``."""

    def handle(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        return split(_first(args), args[1], arg(args, kwargs, 2, "dim", 0), chunk)

    return handle


def _linear(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    w, b = arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if not isinstance(w, ParamRef):
        raise Unsupported("F.linear with a computed weight")
    return linear(g, _first(args), w.name, _name(b), transposed=w.transposed)


def _conv(transposed: bool) -> Handler:
    def handle(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        w, b = arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
        groups = arg(args, kwargs, 6, "groups", 1)
        if not isinstance(w, ParamRef) or w.transposed:
            raise Unsupported("convolution with a computed weight")
        return conv(
            g,
            _first(args),
            w.name,
            _name(b),
            groups=groups if isinstance(groups, int) else 1,
            stride=arg(args, kwargs, 3, "stride", 1),
            transposed=transposed,
        )

    return handle


def _normalized_size(shape: Any, what: str) -> int:
    """The one normalised size of ``normalized_shape`` (an int or a 1-element sequence)."""
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    if len(shape) != 1 or not isinstance(shape[0], int):
        raise Unsupported(f"{what} over several dimensions")
    return shape[0]


def _layer_norm(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    shape = arg(args, kwargs, 1, "normalized_shape")
    w, b = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    size = _normalized_size(shape, "layer_norm")
    return norm(g, _first(args), NodeType.LAYERNORM, size, _name(w), _name(b), channel_first=False)


def _rms_norm(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    shape = arg(args, kwargs, 1, "normalized_shape")
    w = arg(args, kwargs, 2, "weight")
    size = _normalized_size(shape, "rms_norm")
    return norm(g, _first(args), NodeType.RMSNORM, size, _name(w), None, channel_first=False)


def _group_norm(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    groups = arg(args, kwargs, 1, "num_groups")
    w, b = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    if not isinstance(w, ParamRef):
        raise Unsupported("group_norm without a weight parameter")
    c = g.tensor(w.name).numel()
    return norm(g, _first(args), NodeType.GROUPNORM, c, w.name, _name(b), channel_first=True, groups=int(groups))


def _running_norm(ntype: NodeType) -> Handler:
    def handle(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        rm, rv = arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 2, "running_var")
        w, b = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
        ref = next((v for v in (w, b, rm, rv) if isinstance(v, ParamRef)), None)
        if ref is None:
            raise Unsupported("batch/instance norm without parameters")
        c = g.tensor(ref.name).numel()
        return norm(g, _first(args), ntype, c, _name(w), _name(b), _name(rm), _name(rv), channel_first=True)

    return handle


def _embedding(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    w = arg(args, kwargs, 1, "weight")
    if not isinstance(w, ParamRef):
        raise Unsupported("embedding with a computed table")
    return embedding(g, _first(args), w.name)


def _build_table() -> dict[Callable[..., Any], Handler]:
    table: dict[Callable[..., Any], Handler] = {}

    def register(functions: Iterable[Callable[..., Any]], handler: Handler) -> None:
        for fn in functions:
            table.setdefault(fn, handler)  # the first registration wins, as in an if-chain

    register([operator.getitem], lambda g, args, kwargs: getitem(args[0], args[1]))
    register([builtins.getattr], lambda g, args, kwargs: attribute(args[0], args[1]))
    for fn, op in BINARY_FUNCTIONS.items():
        register([fn], binary_handler(op))
    register(POW_FUNCTIONS, lambda g, args, kwargs: power(_first(args), args[1]))
    for fn in UNARY_FUNCTIONS:
        register([fn], _unary(fn))
    register(REDUCE_FUNCTIONS, handle_reduce)
    register([torch.flatten], handle_flatten)
    register([torch.reshape], lambda g, args, kwargs: reshape(_first(args), arg(args, kwargs, 1, "shape")))
    register([torch.transpose], _transpose)
    register([torch.permute], lambda g, args, kwargs: permute(_first(args), arg(args, kwargs, 1, "dims")))
    register([torch.squeeze], lambda g, args, kwargs: squeeze(_first(args), arg(args, kwargs, 1, "dim")))
    register([torch.unsqueeze], lambda g, args, kwargs: unsqueeze(_first(args), arg(args, kwargs, 1, "dim")))
    register(
        [torch.cat, torch.concat, torch.concatenate],
        lambda g, args, kwargs: cat(g, _items(args[0]), arg(args, kwargs, 1, "dim", 0)),
    )
    register([torch.stack], lambda g, args, kwargs: stack(g, _items(args[0]), arg(args, kwargs, 1, "dim", 0)))
    register(_MAX_POOLS_WITH_INDICES, _with_indices)
    register([torch.split], split_handler(chunk=False))
    register([torch.chunk], split_handler(chunk=True))
    register(CREATE_FUNCTIONS, lambda g, args, kwargs: FREE)
    register([F.linear], _linear)
    register(_CONVS, _conv(transposed=False))
    register(_CONV_TRANSPOSES, _conv(transposed=True))
    register([F.layer_norm], _layer_norm)
    if hasattr(F, "rms_norm"):
        register([F.rms_norm], _rms_norm)
    register([F.group_norm], _group_norm)
    register([F.batch_norm], _running_norm(NodeType.BATCHNORM))
    register([F.instance_norm], _running_norm(NodeType.INSTANCENORM))
    register([F.embedding], _embedding)
    return table


FUNCTION_HANDLERS: dict[Callable[..., Any], Handler] = _build_table()
"""Function -> handler for every function with semantics here."""


def call_function(g: GraphEmitter, fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Apply the semantics of function ``fn`` to abstract arguments.

    Args:
        g: The graph being emitted.
        fn: The traced function.
        args: Abstract positional arguments.
        kwargs: Abstract keyword arguments.

    Returns:
        The abstract result.

    Raises:
        Unsupported: For an unknown function of values that carry neurons.
    """
    handler = FUNCTION_HANDLERS.get(fn)
    if handler is not None:
        return handler(g, args, kwargs)
    name = getattr(fn, "__name__", repr(fn))
    if name in PASS_THROUGH_NAMES:
        return _first(args)
    return value_of_unknown_call(args, kwargs, f"function {name}")
