"""Dispatch of ``torch.nn`` layers (fx ``call_module`` nodes): a table from layer class to its semantics.

:data:`MODULE_HANDLERS` is ordered: the first class a module is an instance of decides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_fms.weights.schema import NodeType
from lightning_fms.weights.tracing.elementwise import merge, param_op
from lightning_fms.weights.tracing.emitter import GraphEmitter
from lightning_fms.weights.tracing.layers import attention, conv, embedding, linear, norm
from lightning_fms.weights.tracing.ops import ACTIVATION_MODULES
from lightning_fms.weights.tracing.shapes import flatten, require_channel
from lightning_fms.weights.tracing.values import FREE, Activation, ParamRef, Unsupported, ValueTuple, arg

ModuleHandler = Callable[[GraphEmitter, Any, str, list[Any], dict[str, Any]], Any]
"""``handler(g, module, qualified_name, args, kwargs) -> value``."""


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _optional(mod: nn.Module, name: str, attr: str) -> str | None:
    """The qualified name of tensor ``attr`` of ``mod``, or ``None`` if the module has none."""
    return f"{_prefix(name)}{attr}" if getattr(mod, attr, None) is not None else None


def _input(args: list[Any], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs.get("input", kwargs.get("x"))


def encoder_layer(g: GraphEmitter, mod: nn.TransformerEncoderLayer, name: str, x: Any) -> Activation:
    """``nn.TransformerEncoderLayer``: self-attention and feed-forward blocks with their residuals and norms.

    Args:
        g: The graph being emitted.
        mod: The encoder layer.
        name: Its qualified name.
        x: The input.

    Returns:
        The output activation.
    """
    pre = f"{name}." if name else ""
    act_fn = mod.activation
    if isinstance(act_fn, nn.Module) and any(True for _ in act_fn.parameters()):
        raise Unsupported("encoder layer activation with parameters")

    def sa(h: Activation) -> Activation:
        return attention(g, mod.self_attn, f"{pre}self_attn", h, h, h).items[0]

    def ff(h: Activation) -> Activation:
        h = call_layer(g, mod.linear1, f"{pre}linear1", [h], {})
        return call_layer(g, mod.linear2, f"{pre}linear2", [h], {})

    def ln(m: nn.Module, sub: str, h: Activation) -> Activation:
        return call_layer(g, m, f"{pre}{sub}", [h], {})

    x = g.act(x, mod.self_attn.embed_dim, -1, None)
    if mod.norm_first:
        x = merge(g, x, sa(ln(mod.norm1, "norm1", x)), "add")
        x = merge(g, x, ff(ln(mod.norm2, "norm2", x)), "add")
    else:
        x = ln(mod.norm1, "norm1", merge(g, x, sa(x), "add"))
        x = ln(mod.norm2, "norm2", merge(g, x, ff(x), "add"))
    return x


def _linear(g: GraphEmitter, mod: nn.Linear, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return linear(g, _input(args, kwargs), f"{_prefix(name)}weight", _optional(mod, name, "bias"))


def _conv(g: GraphEmitter, mod: Any, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    if mod.padding_mode != "zeros" and mod.transposed:
        raise Unsupported("transposed convolution with non-zero padding mode")
    return conv(
        g,
        _input(args, kwargs),
        f"{_prefix(name)}weight",
        _optional(mod, name, "bias"),
        groups=mod.groups,
        stride=mod.stride,
        transposed=mod.transposed,
    )


def _running_norm(ntype: NodeType) -> ModuleHandler:
    """Batch or instance normalisation (features in dimension 1, running statistics)."""

    def handle(g: GraphEmitter, mod: Any, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return norm(
            g,
            _input(args, kwargs),
            ntype,
            mod.num_features,
            _optional(mod, name, "weight"),
            _optional(mod, name, "bias"),
            _optional(mod, name, "running_mean"),
            _optional(mod, name, "running_var"),
            channel_first=True,
        )

    return handle


def _last_dim_norm(ntype: NodeType, with_bias: bool) -> ModuleHandler:
    """Layer or RMS normalisation over the last dimension."""
    kind = "LayerNorm" if ntype == NodeType.LAYERNORM else "RMSNorm"

    def handle(g: GraphEmitter, mod: Any, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if len(mod.normalized_shape) != 1:
            raise Unsupported(f"{kind} over shape {tuple(mod.normalized_shape)}")
        bias = _optional(mod, name, "bias") if with_bias else None
        x = _input(args, kwargs)
        return norm(g, x, ntype, mod.normalized_shape[0], _optional(mod, name, "weight"), bias, channel_first=False)

    return handle


def _group_norm(g: GraphEmitter, mod: nn.GroupNorm, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return norm(
        g,
        _input(args, kwargs),
        NodeType.GROUPNORM,
        mod.num_channels,
        _optional(mod, name, "weight"),
        _optional(mod, name, "bias"),
        channel_first=True,
        groups=mod.num_groups,
    )


def _embedding(g: GraphEmitter, mod: nn.Embedding, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return embedding(g, _input(args, kwargs), f"{_prefix(name)}weight")


def _attention(g: GraphEmitter, mod: nn.MultiheadAttention, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    q = arg(args, kwargs, 0, "query")
    k = arg(args, kwargs, 1, "key")
    v = arg(args, kwargs, 2, "value")
    return attention(g, mod, name, q, k, v)


def _encoder_layer(
    g: GraphEmitter, mod: nn.TransformerEncoderLayer, name: str, args: list[Any], kwargs: dict[str, Any]
) -> Any:
    return encoder_layer(g, mod, name, arg(args, kwargs, 0, "src"))


def _encoder(g: GraphEmitter, mod: nn.TransformerEncoder, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    pre = _prefix(name)
    h = arg(args, kwargs, 0, "src")
    for i, layer in enumerate(mod.layers):
        h = encoder_layer(g, layer, f"{pre}layers.{i}", h)
    if mod.norm is not None:
        h = call_layer(g, mod.norm, f"{pre}norm", [h], {})
    return h


def _prelu(g: GraphEmitter, mod: nn.PReLU, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    x = _input(args, kwargs)
    xa = x if isinstance(x, Activation) else g.act(x, mod.num_parameters, 1, None)
    weight = ParamRef(f"{_prefix(name)}weight")
    if mod.num_parameters == 1:
        return param_op(g, xa, weight, "mul")
    require_channel(xa, "PReLU")  # one weight per channel, dimension 1 whatever the rank
    return param_op(g, xa, weight, "mul", feature_axis=0)


def _flatten(g: GraphEmitter, mod: nn.Flatten, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return flatten(_input(args, kwargs), mod.start_dim, mod.end_dim)


def _pass_through(g: GraphEmitter, mod: nn.Module, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    x = _input(args, kwargs)
    if getattr(mod, "return_indices", False):
        return ValueTuple((x, FREE))
    return x


MODULE_HANDLERS: tuple[tuple[type | tuple[type, ...], ModuleHandler], ...] = (
    (nn.Linear, _linear),
    (nn.modules.conv._ConvNd, _conv),
    (nn.modules.batchnorm._BatchNorm, _running_norm(NodeType.BATCHNORM)),
    (nn.modules.instancenorm._InstanceNorm, _running_norm(NodeType.INSTANCENORM)),
    (nn.LayerNorm, _last_dim_norm(NodeType.LAYERNORM, with_bias=True)),
    *(((nn.RMSNorm, _last_dim_norm(NodeType.RMSNORM, with_bias=False)),) if hasattr(nn, "RMSNorm") else ()),
    (nn.GroupNorm, _group_norm),
    (nn.Embedding, _embedding),
    (nn.MultiheadAttention, _attention),
    (nn.TransformerEncoderLayer, _encoder_layer),
    (nn.TransformerEncoder, _encoder),
    (nn.PReLU, _prelu),
    (nn.Flatten, _flatten),
    (ACTIVATION_MODULES, _pass_through),
)
"""``(layer class, handler)`` in order of precedence."""


def call_layer(g: GraphEmitter, mod: nn.Module, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Apply the semantics of the ``torch.nn`` layer ``mod`` (qualified name ``name``) to abstract arguments.

    Args:
        g: The graph being emitted.
        mod: The layer.
        name: Its qualified name in the traced module (``""`` for the root).
        args: Abstract positional arguments.
        kwargs: Abstract keyword arguments.

    Returns:
        The abstract output.

    Raises:
        Unsupported: For layers without semantics here (recurrent layers, ...).
    """
    for cls, handler in MODULE_HANDLERS:
        if isinstance(mod, cls):
            return handler(g, mod, name, args, kwargs)
    kind = "layer" if any(True for _ in mod.parameters(recurse=False)) else "operation"
    raise Unsupported(f"unsupported {kind} {type(mod).__name__}")
