"""View and shape semantics: where the features of an activation are after a view, reduction or index.

All functions here are pure: they map abstract values (:mod:`~lightning_fms.weights.tracing.values`) to abstract
values and create no nodes; whatever moves the features in a way the interpreter cannot follow raises
:class:`~lightning_fms.weights.tracing.values.Unsupported`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_fms.weights.tracing.values import (
    FREE,
    Activation,
    LazyInput,
    ParamRef,
    RepeatedValue,
    Segment,
    Unsupported,
    ValueTuple,
    as_int,
    contains,
)


def same_dim(x: Activation, d: int) -> bool | None:
    """Whether dimension ``d`` (negative: from the end) is the feature dimension of ``x``.

    Returns:
        ``True`` or ``False``, or ``None`` when the rank is unknown and ``d`` and ``x.fdim`` count from opposite ends.
    """
    if x.fdim is None:
        return False
    if x.rank is not None:
        return d % x.rank == x.fdim % x.rank
    if (d >= 0) == (x.fdim >= 0):
        return d == x.fdim
    return None


def require_last(x: Activation, what: str) -> None:
    """Raise :class:`Unsupported` unless the features of ``x`` are in its last dimension (``what`` reads them)."""
    if x.fdim is None:
        raise Unsupported(f"{what} reads an activation without a feature dimension")
    if x.rank is not None and x.fdim % x.rank != x.rank - 1:
        raise Unsupported(f"{what} reads dimension -1 but the features are in dimension {x.fdim}")
    if x.rank is None and x.fdim >= 0 and x.fdim != 1:
        raise Unsupported(f"{what} reads dimension -1 but the features are in dimension {x.fdim}")


def require_channel(x: Activation, what: str) -> None:
    """Raise :class:`Unsupported` unless the features of ``x`` are in dimension 1 (channels first)."""
    if x.fdim is None:
        raise Unsupported(f"{what} reads an activation without a feature dimension")
    ok = same_dim(x, 1)
    if ok is False or (ok is None and x.fdim != -1):
        raise Unsupported(f"{what} reads dimension 1 but the features are in dimension {x.fdim}")


def flatten(x: Any, start: int = 0, end: int = -1) -> Any:
    """``torch.flatten(x, start, end)``: the features stay, flattened with the spatial positions when inside the range.

    Args:
        x: Any abstract value (only activations change).
        start: First flattened dimension.
        end: Last flattened dimension.

    Returns:
        The value after flattening.
    """
    if not isinstance(x, Activation):
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
                raise Unsupported("flattening an already flattened feature map")
            layout = "major" if f == s else ("minor" if f == e else None)
            if layout is None:
                raise Unsupported("flattening with the features in the middle")
            return Activation(x.segs, s, new_rank, layout)
        if f > e:
            return Activation(x.segs, f - (e - s), new_rank, x.flat)
        return Activation(x.segs, f, new_rank, x.flat)
    f = x.fdim
    if f >= 0:
        if start > f:
            return Activation(x.segs, f, None, x.flat)
        if start == f:
            if x.flat is not None:
                raise Unsupported("flattening an already flattened feature map")
            return Activation(x.segs, f, None if end != -1 else f + 1, "major")
        if 0 <= end < f:
            return Activation(x.segs, f - (end - start), None, x.flat)
        raise Unsupported("flattening across the feature dimension of a tensor of unknown rank")
    # negative fdim, unknown rank
    if end == -1 and f == -1 and start >= 0:
        if x.flat is not None:
            raise Unsupported("flattening an already flattened feature map")
        return Activation(x.segs, start, start + 1, "minor")
    if end >= 0 or end < f:
        return Activation(x.segs, f, None, x.flat)
    raise Unsupported("flattening across the feature dimension of a tensor of unknown rank")


def reshape(x: Any, shape: Sequence[Any]) -> Any:
    """``x.view(*shape)`` / ``x.reshape(shape)``: allowed where the features keep their dimension."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    if not isinstance(x, Activation):
        return x
    if len(shape) == 2 and as_int(shape[1]) == -1:
        return flatten(x, 1, -1)
    if len(shape) == 1:
        return flatten(x, 0, -1)
    new_rank = len(shape)
    if x.fdim is None:
        return Activation(x.segs, None, new_rank, x.flat)
    if x.rank is not None and new_rank == x.rank:
        return x
    last = as_int(shape[-1])
    if x.flat is None and (x.fdim == -1 or (x.rank is not None and x.fdim % x.rank == x.rank - 1)):
        if last == x.size or last is None or last == -1:
            return Activation(x.segs, -1, new_rank, None)
    if x.fdim >= 0 and x.fdim < new_rank and x.flat is None:
        return Activation(x.segs, x.fdim, new_rank, None)
    raise Unsupported(f"reshape to {len(shape)} dimensions moves the features")


def transpose(x: Any, a: int, b: int) -> Any:
    """``x.transpose(a, b)``: the feature dimension moves if it is ``a`` or ``b``."""
    if not isinstance(x, Activation) or x.fdim is None:
        return x
    sa, sb = same_dim(x, a), same_dim(x, b)
    if sa:
        other = b
    elif sb:
        other = a
    else:
        return x
    if x.rank is not None:
        other %= x.rank
    elif (other >= 0) != (x.fdim >= 0):
        raise Unsupported("transpose of a tensor of unknown rank")
    return Activation(x.segs, other, x.rank, x.flat)


def permute(x: Any, dims: Sequence[Any]) -> Any:
    """``x.permute(*dims)``: the feature dimension goes where ``dims`` puts it."""
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    if not isinstance(x, Activation) or x.fdim is None:
        return x
    r = len(dims)
    norm = [int(d) % r for d in dims]
    return Activation(x.segs, norm.index(x.fdim % r), r, x.flat)


def squeeze(x: Any, dim: Any) -> Any:
    """``x.squeeze(dim)``: a single feature is squeezed away; other dimensions shift the feature dimension."""
    if not isinstance(x, Activation) or x.fdim is None:
        return x
    if dim is None:
        if x.size == 1 and x.flat is None:
            return Activation(x.segs, None, None, None)
        return Activation(x.segs, x.fdim if x.fdim < 0 else x.fdim, None, x.flat)
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    f, r = x.fdim, x.rank
    for d in dims:
        same = same_dim(Activation(x.segs, f, r), d)
        if same:
            if x.size == 1 and x.flat is None:
                return Activation(x.segs, None, None if r is None else r - 1, None)
            continue  # squeezing a dimension of size > 1 is a no-op
        if r is not None:
            if d % r < f % r:
                f = f % r - 1
            r -= 1
        elif f >= 0 and d >= 0 and d < f:
            f -= 1
    return Activation(x.segs, f, r, x.flat)


def unsqueeze(x: Any, dim: int) -> Any:
    """``x.unsqueeze(dim)``: the feature dimension shifts if the new one is before it."""
    if not isinstance(x, Activation) or x.fdim is None:
        return x
    f, r = x.fdim, x.rank
    if r is not None:
        d = dim % (r + 1)
        fp = f % r
        return Activation(x.segs, fp + 1 if d <= fp else fp, r + 1, x.flat)
    if f >= 0 and dim >= 0:
        return Activation(x.segs, f + 1 if dim <= f else f, None, x.flat)
    if f < 0 and dim < 0:
        return Activation(x.segs, f - 1 if dim >= f else f, None, x.flat)
    return Activation(x.segs, f, None, x.flat)


def reduce(x: Any, dim: Any, keepdim: bool) -> Any:
    """A reduction (``mean``, ``sum``, ``max``, ...) over ``dim``.

    Returns:
        :data:`FREE` if it reduces over the features (or over everything), else the activation with its feature
        dimension shifted (unchanged with ``keepdim``).
    """
    if not isinstance(x, Activation):
        return FREE if not isinstance(x, (ParamRef, LazyInput)) else x
    if dim is None or x.fdim is None:
        return FREE
    dims = list(dim) if isinstance(dim, (tuple, list)) else [dim]
    if any(same_dim(x, int(d)) for d in dims):
        return FREE
    if keepdim:
        return x
    f, r = x.fdim, x.rank
    if r is not None:
        fp = f % r
        f = fp - sum(1 for d in dims if int(d) % r < fp)
        return Activation(x.segs, f, r - len(dims), x.flat)
    if f >= 0:
        f -= sum(1 for d in dims if 0 <= int(d) < f)
    return Activation(x.segs, f, None, x.flat)


def slice_segments(segs: tuple[Segment, ...], sel: slice) -> tuple[Segment, ...]:
    """The segments of ``segs`` selected by ``sel`` (a unit-step slice of their concatenation).

    Args:
        segs: Segments ``(set, lo, hi)``.
        sel: Slice of the concatenated features.

    Returns:
        The selected segments, in order.
    """
    total = sum(hi - lo for _, lo, hi in segs)
    start, stop, step = sel.indices(total)
    if step != 1:
        raise Unsupported("strided slicing of features")
    out = []
    pos = 0
    for s, lo, hi in segs:
        n = hi - lo
        a, b = max(start - pos, 0), min(stop - pos, n)
        if a < b:
            out.append((s, lo + a, lo + b))
        pos += n
    if not out:
        raise Unsupported("empty feature slice")
    return tuple(out)


def _index_features(x: Activation, segs: tuple[Segment, ...], item: Any) -> tuple[tuple[Segment, ...], bool]:
    """Apply one index ``item`` to the feature dimension: ``(segments after it, whether the dimension is gone)``."""
    if isinstance(item, slice):
        if item != slice(None):
            if x.flat is not None:
                raise Unsupported("slicing flattened features")
            segs = slice_segments(segs, item)
        return segs, False
    if as_int(item) is not None:
        return slice_segments(segs, slice(as_int(item), as_int(item) + 1 or None)), True
    raise Unsupported("advanced indexing of the feature dimension")


def getitem(x: Any, idx: Any) -> Any:
    """``x[idx]``: items of tuples, slices and integer indices of the feature dimension, ``None`` and ``...``.

    Args:
        x: Any abstract value.
        idx: The index (constants, slices, ``None``, ``Ellipsis``, or tuples of them).

    Returns:
        The indexed value (an integer index of the features leaves an activation without a feature dimension).
    """
    if isinstance(x, ValueTuple):
        i = as_int(idx)
        if i is None:
            raise Unsupported("non-constant index into a tuple of activations")
        return x.items[i]
    if isinstance(x, RepeatedValue):
        return x.item
    if isinstance(x, (list, tuple)):
        i = as_int(idx)
        return x[i] if i is not None else FREE
    if isinstance(x, (ParamRef, LazyInput)):
        return x
    if not isinstance(x, Activation):
        return FREE
    if contains(idx, (Activation, LazyInput)):
        raise Unsupported("indexing with an activation")
    items = idx if isinstance(idx, tuple) else (idx,)
    if x.fdim is None:
        return x
    if sum(1 for i in items if i is Ellipsis) > 1:
        raise Unsupported("indexing with several ellipses")
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
            segs, removed = _index_features(x, segs, item)
            removed_fdim = removed_fdim or removed
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
            segs, removed = _index_features(x, segs, item)
            removed_fdim = removed_fdim or removed
        d -= 1
    if removed_fdim:
        return Activation(segs, None, None, None)
    n_removed = sum(1 for i in items if i is not None and i is not Ellipsis and not isinstance(i, slice))
    n_added = sum(1 for i in items if i is None)
    new_rank = None if r is None else r - n_removed + n_added
    if f >= 0:
        new_f = f + shift
    else:
        new_f = f
        if post:
            new_f = f - sum(1 for i in post if i is None)
    return Activation(segs, new_f, new_rank, x.flat)


def split(x: Any, size: Any, dim: int, chunk: bool) -> Any:
    """``torch.split`` (``chunk=False``: ``size`` per part or a list of sizes) or ``torch.chunk`` (``size`` parts).

    Returns:
        A :class:`ValueTuple` of the feature slices when ``dim`` is the feature dimension, else a
        :class:`RepeatedValue` of ``x``.
    """
    if not isinstance(x, Activation):
        return RepeatedValue(x)
    if not same_dim(x, dim):
        return RepeatedValue(x)
    if x.flat is not None:
        raise Unsupported("splitting flattened features")
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
        out.append(Activation(slice_segments(x.segs, slice(pos, pos + s)), x.fdim, x.rank))
        pos += s
    return ValueTuple(tuple(out))


def attribute(x: Any, attr: str) -> Any:
    """``x.T`` / ``x.mT`` transpose (a parameter's transposition is recorded); every other attribute is :data:`FREE`."""
    if attr in ("T", "mT"):
        if isinstance(x, ParamRef):
            return ParamRef(x.name, not x.transposed)
        if isinstance(x, Activation):
            return transpose(x, -2, -1)
        return x
    return FREE
