"""Trace a module with ``torch.fx`` and interpret the traced program abstractly into a :class:`GraphTopology`.

Each fx node is dispatched by its kind: ``call_module`` to :func:`~lightning_fms.weights.tracing.modules.call_layer`,
``call_function`` to :func:`~lightning_fms.weights.tracing.functions.call_function` and ``call_method`` to
:func:`~lightning_fms.weights.tracing.methods.call_method`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from lightning_fms.errors import failure_message, first_line
from lightning_fms.weights.schema import GraphOptions
from lightning_fms.weights.topology import GraphTopology
from lightning_fms.weights.tracing.emitter import GraphEmitter
from lightning_fms.weights.tracing.fallback import fallback_topology
from lightning_fms.weights.tracing.functions import call_function
from lightning_fms.weights.tracing.methods import call_method
from lightning_fms.weights.tracing.modules import call_layer
from lightning_fms.weights.tracing.size_varargs import sizes_as_one_tuple
from lightning_fms.weights.tracing.values import (
    FREE,
    Activation,
    LazyInput,
    ParamRef,
    RepeatedValue,
    Unsupported,
    ValueTuple,
)


class LeafTracer(fx.Tracer):
    """``torch.nn`` layers are leaves; user-written modules (and containers) are traced through.

    Buffers are traced as ``get_attr`` nodes like parameters (``proxy_buffer_attributes``): computations on a
    buffer stay in the program instead of running on the concrete tensor, which ``torch`` rejects for some calls
    with traced arguments (``buffer.expand(x.shape[0], -1)``).
    """

    proxy_buffer_attributes = True

    def trace(self, root: nn.Module | Callable[..., Any], concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """Trace ``root`` (sizes given as varargs may hold traced values: :func:`sizes_as_one_tuple`)."""
        with sizes_as_one_tuple():
            return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Whether ``m`` is kept as one ``call_module`` node."""
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return type(m).__module__.startswith(("torch.nn", "torch.ao.nn"))


def _leaf_root(module: nn.Module) -> bool:
    return LeafTracer().is_leaf_module(module, "")


def run_graph(g: GraphEmitter, graph: fx.Graph) -> None:
    """Interpret a traced program node by node, then mark the neurons that reach its output.

    Args:
        g: The graph being emitted (its ``root`` is the traced module).
        graph: The traced program.
    """
    env: dict[fx.Node, Any] = {}
    outputs: Any = None
    for node in graph.nodes:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "placeholder":
            concrete = node.args and (node.args[0] is None or isinstance(node.args[0], (bool, int, float, str)))
            env[node] = FREE if concrete else LazyInput(str(node.target))
        elif node.op == "get_attr":
            target = str(node.target)
            env[node] = ParamRef(target) if target in g.tensors and target not in g.constants else FREE
        elif node.op == "call_module":
            env[node] = call_layer(g, g.root.get_submodule(str(node.target)), str(node.target), args, kwargs)
        elif node.op == "call_function":
            env[node] = call_function(g, node.target, args, kwargs)
        elif node.op == "call_method":
            env[node] = call_method(g, str(node.target), args, kwargs)
        elif node.op == "output":
            outputs = args[0]
    _mark_outputs(g, outputs)


def run_leaf_root(g: GraphEmitter) -> None:
    """Interpret a root that is itself a ``torch.nn`` layer (nothing to trace) applied to network inputs."""
    mod = g.root
    if isinstance(mod, nn.MultiheadAttention):
        out = call_layer(g, mod, "", [LazyInput("query"), LazyInput("key"), LazyInput("value")], {})
    else:
        out = call_layer(g, mod, "", [LazyInput("input")], {})
    _mark_outputs(g, out)


def _mark_outputs(g: GraphEmitter, outputs: Any) -> None:
    """Give the neurons of every activation in ``outputs`` their output position and keep them in place."""
    acts: list[Activation] = []

    def walk(v: Any) -> None:
        if isinstance(v, Activation):
            acts.append(v)
        elif isinstance(v, ValueTuple):
            for i in v.items:
                walk(i)
        elif isinstance(v, RepeatedValue):
            walk(v.item)
        elif isinstance(v, (list, tuple)):
            for i in v:
                walk(i)
        elif isinstance(v, dict):
            for i in v.values():
                walk(i)

    walk(outputs)
    if not acts:
        raise Unsupported("no traced neuron reaches the output")
    for a in acts:
        nodes = g.nodes(a.segs)
        g.io_updates.append((nodes, torch.arange(nodes.numel(), dtype=torch.float32)))
        g.sym.frozen.update(s for s, _, _ in a.segs)


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
    """Trace ``module`` and build its topology, or the statistics fallback (never raises for user modules).

    Args:
        module: Any module.
        options: The graph options.
        signature: Its architecture signature (stored in the topology).

    Returns:
        The traced topology, or the fallback with its ``fallback_reason`` (one line).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = GraphEmitter(module, options)
            if _leaf_root(module):
                run_leaf_root(g)
            else:
                graph = LeafTracer().trace(module, concrete_args=_concrete_defaults(module))
                run_graph(g, graph)
            return g.topology(signature)
    except Unsupported as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - user code may raise anything while being traced
        reason = "cannot trace: " + failure_message(exc)
    reason = first_line(reason, limit=300) or "unsupported"
    return fallback_topology(module, options, signature, reason)
