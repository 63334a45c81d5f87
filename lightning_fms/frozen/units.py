"""Frozen layers as a fidelity: train only the last ``k`` layer units of a network.

Following Carstensen, Mallik, Hutter and Rapp, "Frozen Layers: Memory-efficient Many-fidelity Hyperparameter
Optimization" (AutoML 2025, arXiv 2504.10735), a network is split into an ordered list of *layer units*, from the
input side to the output side. At fidelity ``k`` only the last ``k`` units train; the first ``n - k`` are frozen
(``requires_grad=False``), so autograd records no graph for the frozen prefix: no stored activations, no backward
pass, no gradients and no optimizer state there.

How a module is split (:func:`layer_units`):

* the module's children are walked in registration order; containers (``nn.Sequential``, ``nn.ModuleList``,
  ``nn.ModuleDict`` and torch's ``nn.Transformer``/``TransformerEncoder``/``TransformerDecoder`` stacks, plus any
  ``container_types``) are unwrapped at any depth;
* a *top-level* child (reached from the root through containers only) that has children of its own is a wrapper
  such as the zoo's ``net.features`` and is unwrapped once, unless it is a block: an instance of
  ``block_types`` (torch's transformer layers and ``nn.MultiheadAttention`` by default), or a module whose own
  ``forward`` (traced shallowly with ``torch.fx``) adds two tensors that both depend on its input (a residual
  connection) or multiplies two such tensors or calls attention (self-attention). A wrapper that cannot be traced
  is kept as one unit, which is the paper's rule for every module that is not a container;
* every other child with parameters is one unit; parameter-free children (activations, pooling, dropout, flatten)
  join no unit;
* parameters registered directly on the root, on a container or on an unwrapped wrapper (a ViT's cls token and
  positional embedding) join the first unit;
* a parameter shared by several units belongs to the one nearest the output.

"Order" is registration order, which is the input-to-output order for every architecture in the zoo and for
ordinary ``nn.Sequential`` models; a module that registers its layers in another order needs ``container_types``
or ``block_types`` (or a reordering) to be split sensibly.

Unit lists of the zoo's architectures (default arguments):

* ``MLP(depth=2)``: ``features.1``, ``features.3``, ``head``;
* ``SmallCNN(depth=2)``: ``features.0``, ``features.3``, ``head``;
* ``TinyResNet(blocks_per_stage=1)``: ``features.0.0`` (stem conv), ``features.0.1`` (stem BN), ``features.1.0``,
  ``features.2.0`` (the two BasicBlocks), ``head``;
* ``TinyViT(depth=2)``: ``features.patch_embed`` (with ``features.cls_token`` and ``features.pos_embed``),
  ``features.blocks.0``, ``features.blocks.1``, ``features.norm``, ``head``;
* ``DeepSets(phi_depth=2, rho_depth=1)``: ``features.phi.0``, ``features.phi.2``, ``features.norm``,
  ``features.rho.0``, ``head``.

Thawing more units later (a trial promoted to a higher fidelity) needs no optimizer surgery when the optimizer holds
*every* parameter from the start: PyTorch's SGD, Adam and AdamW skip parameters whose ``.grad`` is ``None``, so a
frozen parameter gets no update, no weight decay and no optimizer state, and a checkpoint resumed with a larger
``k`` continues exactly.
"""

from __future__ import annotations

import logging
import numbers
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _NormBase

from lightning_fms.errors import FMSError

__all__ = [
    "DEFAULT_BLOCK_TYPES",
    "DEFAULT_CONTAINER_TYPES",
    "LayerUnit",
    "layer_units",
    "set_trainable_units",
    "trainable_fraction",
    "trainable_fractions",
]

DEFAULT_CONTAINER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
)
"""Modules that are always unwrapped: their children (recursively) are the candidates for units."""

DEFAULT_BLOCK_TYPES: tuple[type[nn.Module], ...] = (
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.MultiheadAttention,
)
"""Modules that are always one unit, wherever they sit."""

_FROZEN_STATS_FLAG = "_fms_frozen_stats"
"""Attribute set on a running-statistics norm layer that :func:`set_trainable_units` put in eval mode."""

_SHAPE_METHODS = frozenset({"size", "dim", "numel", "get_device"})
_ADD_FUNCTIONS = frozenset({operator.add, operator.iadd, torch.add})
_ADD_METHODS = frozenset({"add", "add_"})
_PRODUCT_FUNCTIONS = frozenset({operator.matmul, torch.matmul, torch.bmm, torch.einsum})
_PRODUCT_METHODS = frozenset({"matmul", "bmm"})
_ATTENTION_FUNCTIONS = frozenset({torch.nn.functional.scaled_dot_product_attention})

_log = logging.getLogger(__name__)


@dataclass(eq=False)
class LayerUnit:
    """One layer unit: what freezes and thaws together.

    Attributes:
        name: Dotted path of the unit's module relative to the split module (``""`` for the module itself when it
            has no children with parameters).
        modules: The unit's module(s). Norm layers with running statistics inside them are put in eval mode while
            the unit is frozen.
        parameter_names: Names (as in the split module's ``named_parameters()``) of every parameter the unit
            owns, including stray parameters joined to the first unit.
        parameters: The parameters, in the order of ``parameter_names``.
    """

    name: str
    modules: tuple[nn.Module, ...]
    parameter_names: tuple[str, ...]
    parameters: tuple[nn.Parameter, ...] = field(repr=False)

    @property
    def numel(self) -> int:
        """Number of scalar parameters in the unit."""
        return sum(p.numel() for p in self.parameters)


def _types(extra: Sequence[type[nn.Module]] | None, default: tuple[type[nn.Module], ...]) -> tuple[type, ...]:
    return default + tuple(extra or ())


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


class _ShallowTracer(fx.Tracer):
    """Traces only a module's own ``forward``: every submodule call stays one opaque node."""

    proxy_buffer_attributes = True  # buffers (e.g. a coordinate grid) become graph nodes, not constants

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:  # noqa: D102
        return True


def _looks_like_block(module: nn.Module) -> bool:
    """Whether ``module``'s own forward has a residual connection or self-attention (``True`` if untraceable).

    Only the module's own ``forward`` is traced (submodules stay opaque). The first argument of ``forward`` is
    the input; a node depends on it when any of its inputs does, except through shape queries
    (``x.shape``, ``x.size()``). The module is a block when it adds two input-dependent tensors (``out + x``),
    multiplies two input-dependent tensors (``q @ k``), calls ``scaled_dot_product_attention`` or calls an
    ``nn.MultiheadAttention`` child.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _ShallowTracer().trace(module)
    except Exception as error:  # noqa: BLE001 - any tracing failure means "keep it as one unit"
        _log.debug("%s is kept as one layer unit: torch.fx cannot trace it (%s)", type(module).__name__, error)
        return True
    dependent: set[fx.Node] = set()
    input_seen = False
    for node in graph.nodes:
        if node.op == "placeholder":
            if not input_seen:
                dependent.add(node)
                input_seen = True
            continue
        if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] == "shape":
            continue
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            continue
        if not any(arg in dependent for arg in node.all_input_nodes):
            continue
        dependent.add(node)
        tensor_args = [arg for arg in node.args if isinstance(arg, fx.Node) and arg in dependent]
        if node.op == "call_function":
            if node.target in _ATTENTION_FUNCTIONS:
                return True
            if node.target in _ADD_FUNCTIONS | _PRODUCT_FUNCTIONS and len(tensor_args) >= 2:
                return True
            if node.target is torch.einsum and len([a for a in node.all_input_nodes if a in dependent]) >= 2:
                return True
        elif node.op == "call_method":
            if node.target in _ADD_METHODS | _PRODUCT_METHODS and len(tensor_args) >= 2:
                return True
        elif node.op == "call_module":
            if isinstance(module.get_submodule(str(node.target)), nn.MultiheadAttention):
                return True
    return False


def _walk(
    module: nn.Module,
    prefix: str,
    top_level: bool,
    units: list[tuple[str, nn.Module]],
    strays: list[nn.Parameter],
    containers: tuple[type, ...],
    blocks: tuple[type, ...],
) -> None:
    """Append ``module``'s units (unwrapping it) to ``units`` and its direct parameters to ``strays``."""
    strays.extend(module.parameters(recurse=False))
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, blocks):
            if _has_parameters(child):
                units.append((path, child))
        elif isinstance(child, containers):
            _walk(child, f"{path}.", top_level, units, strays, containers, blocks)
        elif top_level and next(child.children(), None) is not None and not _looks_like_block(child):
            _walk(child, f"{path}.", False, units, strays, containers, blocks)
        elif _has_parameters(child):
            units.append((path, child))


def layer_units(
    module: nn.Module,
    *,
    block_types: Sequence[type[nn.Module]] | None = None,
    container_types: Sequence[type[nn.Module]] | None = None,
) -> list[LayerUnit]:
    """Split ``module`` into its layer units, from the input side to the output side.

    See the module docstring for the rule; in short: registration order after unwrapping containers and one
    level of wrapper modules; a residual or attention block is one unit; stray parameters join the first unit;
    parameter-free layers join no unit.

    Args:
        module: The network (for a Lightning module wrapping a hub network, pass the network, e.g. ``model.net``).
        block_types: Extra module classes that are always one unit (added to :data:`DEFAULT_BLOCK_TYPES`).
        container_types: Extra module classes that are always unwrapped, at any depth (added to
            :data:`DEFAULT_CONTAINER_TYPES`); the paper's "user-given container class".

    Returns:
        The units, input side first; empty when ``module`` has no parameters. Every parameter of ``module``
        belongs to exactly one unit.

    """
    blocks = _types(block_types, DEFAULT_BLOCK_TYPES)
    containers = _types(container_types, DEFAULT_CONTAINER_TYPES)
    found: list[tuple[str, nn.Module]] = []
    strays: list[nn.Parameter] = []
    if isinstance(module, blocks) and _has_parameters(module):
        found.append(("", module))
    else:
        _walk(module, "", True, found, strays, containers, blocks)
    if not found and strays:
        found.append(("", module))  # a module with parameters but no children holding any: one unit
    owner: dict[int, int] = {}
    for index, (_, unit_module) in enumerate(found):
        for param in unit_module.parameters():
            owner[id(param)] = index  # later units overwrite: a shared parameter goes to the one nearest the output
    for param in strays:
        owner.setdefault(id(param), 0)
    names: list[list[str]] = [[] for _ in found]
    params: list[list[nn.Parameter]] = [[] for _ in found]
    for name, param in module.named_parameters():
        index = owner[id(param)]
        names[index].append(name)
        params[index].append(param)
    return [
        LayerUnit(name=path, modules=(unit_module,), parameter_names=tuple(n), parameters=tuple(p))
        for (path, unit_module), n, p in zip(found, names, params)
    ]


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise FMSError(f"the number of trainable layer units k must be an integer >= 1, got {k!r}")
    return int(k)


def _running_stat_norms(units: Sequence[LayerUnit]) -> list[nn.Module]:
    return [
        m
        for unit in units
        for top in unit.modules
        for m in top.modules()
        if isinstance(m, _NormBase) and m.track_running_stats
    ]


def _apply(root: nn.Module, units: Sequence[LayerUnit], k: int) -> list[str]:
    """Freeze all but the last ``k`` of ``units`` (of ``root``); return the trainable parameter names."""
    k = min(_check_k(k), len(units))
    frozen, trainable = units[: len(units) - k], units[len(units) - k :]
    for unit in frozen:
        for param in unit.parameters:
            param.requires_grad_(False)
            param.grad = None  # a zero gradient would still get weight decay and momentum from the optimizer
    for unit in trainable:
        for param in unit.parameters:
            param.requires_grad_(True)
    for norm in _running_stat_norms(frozen):
        norm.eval()
        setattr(norm, _FROZEN_STATS_FLAG, True)
    for norm in _running_stat_norms(trainable):
        if getattr(norm, _FROZEN_STATS_FLAG, False):
            norm.train(root.training)
            delattr(norm, _FROZEN_STATS_FLAG)
    return [name for unit in trainable for name in unit.parameter_names]


def set_trainable_units(
    module: nn.Module,
    k: int,
    *,
    block_types: Sequence[type[nn.Module]] | None = None,
    container_types: Sequence[type[nn.Module]] | None = None,
) -> list[str]:
    """Leave only the last ``k`` layer units of ``module`` trainable.

    Parameters of the first ``n - k`` units get ``requires_grad=False`` (and their ``.grad`` is cleared); those of
    the last ``k`` get ``requires_grad=True``, overriding any earlier setting. Norm layers with running
    statistics (BatchNorm, SyncBatchNorm, tracking InstanceNorm) inside frozen units are put in eval mode, so their
    statistics stay fixed and they normalise with them; when a later call thaws their unit they return to
    ``module``'s mode. Lightning 2.6 keeps per-module modes across its validation loops; code that calls
    ``module.train()`` undoes the eval mode (:class:`FrozenUnits` re-applies it).

    Args:
        module: The network.
        k: Number of trainable units counted from the output side, ``>= 1``; ``k >= n`` makes everything trainable.
        block_types: See :func:`layer_units`.
        container_types: See :func:`layer_units`.

    Returns:
        The names of the trainable parameters, in ``named_parameters()`` order within each unit.

    Raises:
        FMSError: When ``k`` is not an integer ``>= 1`` or ``module`` has no parameters.

    """
    k = _check_k(k)
    units = layer_units(module, block_types=block_types, container_types=container_types)
    if not units:
        raise FMSError(f"{type(module).__name__} has no parameters to split into layer units")
    return _apply(module, units, k)


def trainable_fraction(
    module: nn.Module,
    k: int,
    *,
    block_types: Sequence[type[nn.Module]] | None = None,
    container_types: Sequence[type[nn.Module]] | None = None,
) -> float:
    """Fraction of ``module``'s scalar parameters that are trainable at ``k`` units (``module`` is not changed).

    Args:
        module: The network.
        k: Number of trainable units counted from the output side, ``>= 1``.
        block_types: See :func:`layer_units`.
        container_types: See :func:`layer_units`.

    Returns:
        A number in ``(0, 1]`` (``1.0`` for ``k >= n``).

    Raises:
        FMSError: When ``k`` is not an integer ``>= 1`` or ``module`` has no parameters.

    """
    k = _check_k(k)
    units = layer_units(module, block_types=block_types, container_types=container_types)
    total = sum(unit.numel for unit in units)
    if total == 0:
        raise FMSError(f"{type(module).__name__} has no parameters to split into layer units")
    return sum(unit.numel for unit in units[max(len(units) - k, 0) :]) / total


def trainable_fractions(
    module: nn.Module,
    *,
    block_types: Sequence[type[nn.Module]] | None = None,
    container_types: Sequence[type[nn.Module]] | None = None,
) -> list[float]:
    """Fraction of ``module``'s scalar parameters trainable at every ``k`` (``module`` is not changed).

    Args:
        module: The network.
        block_types: See :func:`layer_units`.
        container_types: See :func:`layer_units`.

    Returns:
        ``n`` numbers, increasing to ``1.0``; entry ``k - 1`` is :func:`trainable_fraction` at ``k``.

    Raises:
        FMSError: When ``module`` has no parameters.

    """
    units = layer_units(module, block_types=block_types, container_types=container_types)
    sizes = [unit.numel for unit in units]
    total = sum(sizes)
    if total == 0:
        raise FMSError(f"{type(module).__name__} has no parameters to split into layer units")
    return [sum(sizes[len(sizes) - k :]) / total for k in range(1, len(sizes) + 1)]
