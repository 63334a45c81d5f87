"""Where a driver's time goes: named methods of its objects timed, nested calls counted once.

:class:`DriverProfile` wraps bound methods of live objects (the optimizer's ``claim``, the ledger's ``commit``,
``save`` and ``write_reports``, ...) in place, on the instance only, so the code that calls them is unchanged.
Each wrapped call's *own* time (its duration minus that of wrapped calls it made) is added to its label, so the
labels add up to the time spent in wrapped calls; :meth:`DriverProfile.unwrap` restores the methods::

    profile = DriverProfile()
    profile.wrap(tuner.optimizer, "claim", "decide")
    profile.wrap(tuner.optimizer.searcher, "select", "decide: surrogate")
    profile.wrap(tuner.ledger, "commit", "commit")
    profile.wrap(tuner.ledger, "save", "state save")
    tuner.run()
    profile.seconds   # {"decide": ..., "decide: surrogate": ..., "commit": ..., "state save": ...}

Calls made in other threads than the one that built the profile (a background fit) are counted apart
(:attr:`DriverProfile.background`), so :attr:`DriverProfile.total` stays the driver thread's own time.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["DriverProfile"]


class DriverProfile:
    """Accumulates the own time and the call count of wrapped methods, per label.

    Attributes:
        seconds: Label -> own seconds of the calls made in the driver's thread (the one that built the profile).
        calls: Label -> number of those calls.
        inclusive: Label -> seconds of those calls, nested wrapped calls included.
        background: Label -> seconds of the calls made in other threads.
        background_calls: Label -> number of those calls.
        events: Every counted driver-thread call as ``(label, start, own seconds, seconds)``, ``start`` on
            :func:`time.perf_counter`'s clock, in the order the calls ended.
    """

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.inclusive: Counter[str] = Counter()
        self.background: Counter[str] = Counter()
        self.background_calls: Counter[str] = Counter()
        self.events: list[tuple[str, float, float, float]] = []
        self._thread = threading.get_ident()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._wrapped: list[tuple[object, str]] = []

    def _stack(self) -> list[float]:
        """Per open wrapped call of this thread: the time spent in wrapped calls it made."""
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def wrap(self, target: object, name: str, label: str, count: Callable[[Any], bool] | None = None) -> None:
        """Time ``target.name(...)`` under ``label`` from now on (an instance attribute shadows the method).

        Args:
            target: The object.
            name: The method's name.
            label: Where its time goes.
            count: Whether a call's result makes it count in :attr:`calls` (``None``: every call does), e.g. a
                claim that found nothing to claim; its time is added either way.

        Raises:
            AttributeError: ``target`` has no callable ``name``.
        """
        method = getattr(target, name)
        if not callable(method):
            raise AttributeError(f"{type(target).__name__}.{name} is not callable")

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = self._stack()
            stack.append(0.0)
            start = time.perf_counter()
            result = None
            try:
                result = method(*args, **kwargs)
                return result
            finally:
                elapsed = time.perf_counter() - start
                own = elapsed - stack.pop()
                if stack:
                    stack[-1] += elapsed
                counted = count is None or bool(count(result))
                with self._lock:
                    if threading.get_ident() == self._thread:
                        self.seconds[label] += own
                        self.calls[label] += int(counted)
                        self.inclusive[label] += elapsed
                        if counted:
                            self.events.append((label, start, own, elapsed))
                    else:
                        self.background[label] += own
                        self.background_calls[label] += 1

        setattr(target, name, timed)
        self._wrapped.append((target, name))

    def unwrap(self) -> None:
        """Restore every wrapped method (the instance attributes are removed)."""
        for target, name in reversed(self._wrapped):
            vars(target).pop(name, None)
        self._wrapped.clear()

    def mean(self, label: str) -> float:
        """Mean own seconds per driver-thread call of ``label`` (``0.0`` if never called)."""
        calls = self.calls[label]
        return self.seconds[label] / calls if calls else 0.0

    @property
    def total(self) -> float:
        """Seconds the driver's thread spent in wrapped calls, all labels together."""
        return sum(self.seconds.values())
