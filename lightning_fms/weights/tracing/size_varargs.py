"""Sizes given as varargs with traced entries: ``torch.zeros(x.shape[0], 4)`` and ``c.expand(x.shape[0], -1)``.

``torch`` parses a size given as varargs only when every entry is an integer, so while ``torch.fx`` traces, a call
on a concrete tensor (or a factory function) whose size holds a traced value (a ``Proxy``, such as ``x.shape[0]``)
raises ``TypeError`` instead of reaching the ``Proxy``. The same size given as one tuple is dispatched to the
``Proxy`` and recorded. :func:`sizes_as_one_tuple` repacks the varargs of the calls in :data:`SIZE_VARARGS_CALLS`
for the duration of a trace.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx

SIZE_VARARGS_CALLS: tuple[tuple[Any, str], ...] = (
    (torch.Tensor, "expand"),
    (torch.Tensor, "new_zeros"),
    (torch.Tensor, "new_ones"),
    (torch.Tensor, "new_empty"),
    (torch, "zeros"),
    (torch, "ones"),
    (torch, "empty"),
    (torch, "rand"),
    (torch, "randn"),
)
"""``(owner, name)`` of every call whose only positional argument is a size (a receiver aside) that ``torch`` also
accepts as varargs and rejects as varargs with a traced entry (``Tensor.repeat``, ``view`` and ``reshape`` accept
them)."""

_LOCK = threading.RLock()


def _repacking(call: Callable[..., Any], method: bool) -> Callable[..., Any]:
    """``call`` with a varargs size holding a ``Proxy`` passed as one tuple (after the receiver if ``method``)."""
    skip = 1 if method else 0

    @functools.wraps(call)
    def repacked(*args: Any, **kwargs: Any) -> Any:
        sizes = args[skip:]
        if len(sizes) > 1 and any(isinstance(s, fx.Proxy) for s in sizes):
            return call(*args[:skip], tuple(sizes), **kwargs)
        return call(*args, **kwargs)

    return repacked


@contextmanager
def sizes_as_one_tuple() -> Iterator[None]:
    """Within the block, the calls of :data:`SIZE_VARARGS_CALLS` accept varargs sizes with traced entries.

    The calls are restored on exit; blocks in several threads run one at a time.
    """
    with _LOCK:
        saved = [(owner, name, owner.__dict__.get(name), getattr(owner, name)) for owner, name in SIZE_VARARGS_CALLS]
        try:
            for owner, name, _, call in saved:
                setattr(owner, name, _repacking(call, method=isinstance(owner, type)))
            yield
        finally:
            for owner, name, own, _ in saved:
                if own is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, own)
