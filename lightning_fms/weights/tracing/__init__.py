"""Parameter-graph tracing: a module's topology from its ``torch.fx`` program, interpreted abstractly.

:func:`build_topology` traces a module and follows which neurons every value of the traced program carries,
emitting a :class:`~lightning_fms.weights.topology.GraphTopology`.

The modules, in the order they depend on each other:

* :mod:`~lightning_fms.weights.tracing.values`: the abstract values (which neurons a value carries).
* :mod:`~lightning_fms.weights.tracing.ops`: the catalogue of recognised operations.
* :mod:`~lightning_fms.weights.tracing.shapes`: view and shape semantics (pure).
* :mod:`~lightning_fms.weights.tracing.emitter`: the graph being emitted and its primitives.
* :mod:`~lightning_fms.weights.tracing.layers`, :mod:`~lightning_fms.weights.tracing.elementwise`: what weight
  layers and elementwise operations emit.
* :mod:`~lightning_fms.weights.tracing.modules`, :mod:`~lightning_fms.weights.tracing.functions`,
  :mod:`~lightning_fms.weights.tracing.methods`: handler tables for fx ``call_module``, ``call_function`` and
  ``call_method`` nodes.
* :mod:`~lightning_fms.weights.tracing.fallback`: the statistics fallback topology.
* :mod:`~lightning_fms.weights.tracing.size_varargs`: varargs sizes with traced entries, repacked while tracing.
* :mod:`~lightning_fms.weights.tracing.interpreter`: tracing and the interpretation loop, :func:`build_topology`.

Operations the interpreter does not model raise :class:`~lightning_fms.weights.tracing.values.Unsupported`;
:func:`build_topology` then builds the statistics fallback.
"""

from lightning_fms.weights.tracing.fallback import fallback_topology
from lightning_fms.weights.tracing.interpreter import build_topology

__all__ = ["build_topology", "fallback_topology"]
