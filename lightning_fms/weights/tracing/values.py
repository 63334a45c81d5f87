"""The abstract values of a traced program: which neurons a value carries, if any.

Every value of the traced program is one of:

* :class:`Activation`: an activation whose feature dimension ``fdim`` is indexed by the concatenated node
  *segments* ``(set, lo, hi)``; ``flat`` marks features flattened together with spatial positions (``"major"``:
  index ``c * k + r``, ``"minor"``: ``r * C + c``, ``k`` unknown until a ``Linear`` reads it); ``rank`` is known
  when a layer fixes it (a ``Conv2d`` output has rank 4) and ``None`` otherwise.
* :class:`LazyInput`: a network input not yet sized; the first layer that reads it creates the input nodes.
* :class:`ParamRef`: a parameter or buffer (or a view of one).
* :data:`FREE`: anything without neuron identity (shapes, masks, statistics reduced over the features, constants).
* :class:`ValueTuple` / :class:`RepeatedValue`: containers (attention outputs, splits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Segment = tuple[int, int, int]
"""``(set, lo, hi)``: nodes ``lo:hi`` of neuron set ``set``."""


class Unsupported(Exception):
    """The traced program uses something the interpreter does not model (the caller builds the fallback)."""


@dataclass(frozen=True)
class Activation:
    """An activation carrying the neurons of ``segs`` along dimension ``fdim`` (see the module docstring).

    Attributes:
        segs: The neuron segments, concatenated along the feature dimension.
        fdim: The feature dimension (negative: counted from the end), or ``None`` if the features were reduced
            into a single position (an indexed feature).
        rank: The tensor's number of dimensions, when known.
        flat: ``"major"`` or ``"minor"`` if the features are flattened with spatial positions, else ``None``.
    """

    segs: tuple[Segment, ...]
    fdim: int | None
    rank: int | None
    flat: str | None = None

    @property
    def size(self) -> int:
        """Number of neurons carried."""
        return sum(hi - lo for _, lo, hi in self.segs)


@dataclass(eq=False)
class LazyInput:
    """A network input whose size the first layer reading it decides (compared by identity)."""

    name: str


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer of the module, by qualified name; ``transposed`` after ``.T``/``.t()``."""

    name: str
    transposed: bool = False


class _FreeType:
    def __repr__(self) -> str:
        return "FREE"


FREE = _FreeType()
"""The value of everything without neuron identity."""


@dataclass(frozen=True)
class ValueTuple:
    """A tuple of abstract values (attention outputs, splits of the features)."""

    items: tuple[Any, ...]


@dataclass(frozen=True)
class RepeatedValue:
    """A container whose every item is ``item`` (splits along a non-feature dimension)."""

    item: Any


def arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of a call, positional or by keyword ``name``."""
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def contains(value: Any, cls: type | tuple[type, ...]) -> bool:
    """Whether ``value`` or anything nested in it (lists, tuples, dicts, slices, value tuples) is a ``cls``."""
    if isinstance(value, cls):
        return True
    if isinstance(value, (list, tuple)):
        return any(contains(v, cls) for v in value)
    if isinstance(value, dict):
        return any(contains(v, cls) for v in value.values())
    if isinstance(value, slice):
        return any(contains(v, cls) for v in (value.start, value.stop, value.step))
    if isinstance(value, (ValueTuple,)):
        return any(contains(v, cls) for v in value.items)
    return False


def first(value: Any, cls: type) -> Any:
    """The first ``cls`` in ``value`` (depth first through lists, tuples and dicts), or ``None``."""
    if isinstance(value, cls):
        return value
    if isinstance(value, (list, tuple)):
        for v in value:
            found = first(v, cls)
            if found is not None:
                return found
    if isinstance(value, dict):
        return first(list(value.values()), cls)
    return None


def as_int(v: Any) -> int | None:
    """``v`` if it is an ``int`` (not a ``bool``), else ``None``."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    return None


def kernel_hw(k: Sequence[int]) -> tuple[int, int]:
    """The ``(kernel_h, kernel_w)`` edge features of a kernel of spatial size ``k`` (folded to 2-d)."""
    if len(k) == 0:
        return 1, 1
    if len(k) == 1:
        return 1, int(k[0])
    if len(k) == 2:
        return int(k[0]), int(k[1])
    return int(math.prod(k[:-1])), int(k[-1])


def value_of_unknown_call(args: Sequence[Any], kwargs: dict[str, Any], what: str) -> Any:
    """The value of an unknown call: a parameter it reads, or :data:`FREE`; unsupported if it reads neurons.

    Args:
        args: Abstract positional arguments.
        kwargs: Abstract keyword arguments.
        what: The call, for the error message.

    Returns:
        The first parameter among the arguments, or :data:`FREE`.
    """
    every = list(args) + list(kwargs.values())
    if not contains(every, (Activation, LazyInput)):
        p = first(every, ParamRef)
        return p if p is not None else FREE
    raise Unsupported(f"unsupported {what}")
