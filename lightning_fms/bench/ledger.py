"""The books of one benchmark run: epochs spent on a tabulated pool, seconds, and the validation-selected incumbent.

Every method (ours and the peers) spends its budget through one :class:`Ledger`, so they are charged alike.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from lightning_fms.bench.metrics import to_scores
from lightning_fms.bench.pool_data import Pool


class BudgetSpent(Exception):
    """Raised by :meth:`Ledger.train` once the budget is spent."""


class Ledger:
    """The books of one run: epochs spent, seconds, and the incumbent selected on validation.

    Args:
        pool: The pool.
        budget: Epochs the method may spend.
    """

    def __init__(self, pool: Pool, budget: int) -> None:
        self.pool = pool
        self.budget = int(budget)
        self.rows: list[dict[str, Any]] = []
        self.train_s = 0.0
        self.decision_s = 0.0
        self.trained = np.zeros(pool.size, dtype=np.int64)
        self._scores = to_scores(pool.val, pool.mode)
        self._best_score = -math.inf
        self._best_val = math.nan
        self._incumbent_test = math.nan

    @property
    def spent(self) -> int:
        """Epochs spent so far."""
        return len(self.rows)

    @property
    def done(self) -> bool:
        """Whether the budget is spent."""
        return self.spent >= self.budget

    @contextlib.contextmanager
    def deciding(self) -> Iterator[None]:
        """Charge the wall seconds of the enclosed block to the method's decision time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.decision_s += time.perf_counter() - start

    def train(self, index: int, epoch: int) -> float:
        """Spend one epoch: epoch ``epoch`` (1-based) of configuration ``index``; returns its validation value.

        Raises:
            BudgetSpent: the budget is already spent.
            ValueError: ``index`` or ``epoch`` is out of the pool's range.
        """
        if self.done:
            raise BudgetSpent
        if not (0 <= index < self.pool.size and 1 <= epoch <= self.pool.epochs):
            raise ValueError(f"configuration {index} epoch {epoch} is outside the pool")
        val = float(self.pool.val[index, epoch - 1])
        test = float(self.pool.test[index, epoch - 1])
        self.train_s += float(self.pool.train_seconds[index, epoch - 1])
        score = float(self._scores[index, epoch - 1])
        if math.isfinite(score) and score > self._best_score:
            self._best_score, self._best_val, self._incumbent_test = score, val, test
        self.trained[index] = epoch
        self.rows.append(
            {
                "epochs_spent": self.spent + 1,
                "config": int(index),
                "epoch": int(epoch),
                "val": val,
                "test": test,
                "best_val": self._best_val,
                "incumbent_test": self._incumbent_test,
                "train_s": self.train_s,
                "decision_s": self.decision_s,
                "wall_s": self.train_s + self.decision_s,
            }
        )
        return val
