"""Dispatch of tensor methods (fx ``call_method`` nodes): a table from method name to its semantics.

A method :data:`METHOD_HANDLERS` does not hold is ignored if no argument carries neurons and
:class:`~lightning_fms.weights.tracing.values.Unsupported` otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lightning_fms.weights.tracing.elementwise import power
from lightning_fms.weights.tracing.emitter import GraphEmitter
from lightning_fms.weights.tracing.functions import (
    Handler,
    binary_handler,
    handle_flatten,
    handle_reduce,
    split_handler,
)
from lightning_fms.weights.tracing.ops import (
    BINARY_METHODS,
    BROADCAST_METHODS,
    CREATE_METHODS,
    LAYOUT_METHODS,
    POW_METHODS,
    REDUCE_METHODS,
    UNARY_METHODS,
)
from lightning_fms.weights.tracing.shapes import permute, reduce, reshape, squeeze, transpose, unsqueeze
from lightning_fms.weights.tracing.values import FREE, ParamRef, RepeatedValue, arg, value_of_unknown_call


def _view(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``x.view(...)`` / ``x.reshape(...)``; a parameter's view is still the parameter."""
    x = args[0]
    shape = list(args[1:]) or [kwargs.get("shape", kwargs.get("size"))]
    if isinstance(x, ParamRef):
        return x
    return reshape(x, shape)


def _transpose(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    if isinstance(x, ParamRef):
        return ParamRef(x.name, not x.transposed)
    return transpose(x, arg(args, kwargs, 1, "dim0"), arg(args, kwargs, 2, "dim1"))


def _t(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    if isinstance(x, ParamRef):
        return ParamRef(x.name, not x.transposed)
    return transpose(x, 0, 1)


def _permute(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    if isinstance(x, ParamRef):
        return x
    return permute(x, list(args[1:]) or kwargs.get("dims"))


def _unbind(g: GraphEmitter, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    return RepeatedValue(reduce(args[0], arg(args, kwargs, 1, "dim", 0), False))


def _build_table() -> dict[str, Handler]:
    table: dict[str, Handler] = {}

    def register(names: Iterable[str], handler: Handler) -> None:
        for name in names:
            table.setdefault(name, handler)  # the first registration wins, as in an if-chain

    for name, op in BINARY_METHODS.items():
        register([name], binary_handler(op))
    register(POW_METHODS, lambda g, args, kwargs: power(args[0], args[1]))
    register(LAYOUT_METHODS, lambda g, args, kwargs: FREE)
    register(CREATE_METHODS, lambda g, args, kwargs: FREE)
    register(UNARY_METHODS, lambda g, args, kwargs: args[0])
    register(REDUCE_METHODS, handle_reduce)
    register(["flatten"], handle_flatten)
    register(["view", "reshape"], _view)
    register(["transpose", "swapaxes", "swapdims"], _transpose)
    register(["t"], _t)
    register(["permute"], _permute)
    register(["squeeze"], lambda g, args, kwargs: squeeze(args[0], arg(args, kwargs, 1, "dim")))
    register(["unsqueeze"], lambda g, args, kwargs: unsqueeze(args[0], arg(args, kwargs, 1, "dim")))
    register(BROADCAST_METHODS, lambda g, args, kwargs: args[0])
    register(["split"], split_handler(chunk=False))
    register(["chunk"], split_handler(chunk=True))
    register(["unbind"], _unbind)
    return table


METHOD_HANDLERS: dict[str, Handler] = _build_table()
"""Method name -> handler (``args[0]`` is the tensor the method is called on)."""


def call_method(g: GraphEmitter, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Apply the semantics of tensor method ``name`` to abstract arguments (``args[0]`` is the receiver).

    Args:
        g: The graph being emitted.
        name: The method name.
        args: Abstract positional arguments, the receiver first.
        kwargs: Abstract keyword arguments.

    Returns:
        The abstract result.

    Raises:
        Unsupported: For an unknown method of values that carry neurons.
    """
    handler = METHOD_HANDLERS.get(name)
    if handler is not None:
        return handler(g, args, kwargs)
    return value_of_unknown_call(args, kwargs, f"method .{name}()")
