"""The surrogate contract: rows in, posterior out.

A *row* is one (configuration, epoch) pair as the surrogate sees it. The optimizer builds rows with
the alignment of DyHPO/FMS done right: the row that predicts epoch ``k`` of a trial sees the
configuration, the budget ``k``, the learning curve *before* ``k`` (``y_1 .. y_{k-1}``) and the
weights *after* epoch ``k-1`` (the hub entry's pretrained weights when ``k == 1``). Nothing from an
epoch not yet trained ever enters a row.

Values in rows and targets are *scores*: larger is better (the optimizer negates a minimised metric).
Normalisation (standardising targets and curves) lives inside each surrogate, never in the caller.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class SurrogateRows:
    """A batch of ``N`` surrogate rows.

    Attributes:
        x: Encoded hyperparameters in the unit cube, shape ``[N, D]`` (float).
        budget: The epoch each row predicts, as a fraction of the per-trial cap, shape ``[N]`` (float,
            in ``(0, 1]``).
        curves: Scores observed before the predicted epoch, left-aligned and zero-padded, shape
            ``[N, L]`` where ``L`` is the per-trial epoch cap (float).
        curve_lengths: How many entries of each curve are real, shape ``[N]`` (long).
        weight_index: Index of each row's weights into ``weights``, shape ``[N]`` (long), or ``None``
            when no weights are given.
        weights: The distinct modules (architecture + weights) that rows refer to, or ``None``. A
            featurizer maps them to a ``[len(weights), d]`` embedding.
        weight_keys: A hashable key per entry of ``weights`` (for caching embeddings), or ``None``.
        reference_index: For each entry of ``weights``, the index (into ``weights``) of the pretrained module its
            run started from (``W_0``; a hub entry points to itself), shape ``[len(weights)]`` (long), or ``None``.
    """

    x: Tensor
    budget: Tensor
    curves: Tensor
    curve_lengths: Tensor
    weight_index: Tensor | None = None
    weights: Sequence[nn.Module] | None = None
    weight_keys: Sequence[Any] | None = None
    reference_index: Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.x.dim() != 2:
            raise ValueError(f"x must be [N, D], got shape {tuple(self.x.shape)}")
        for name in ("budget", "curve_lengths"):
            value = getattr(self, name)
            if value.shape != (n,):
                raise ValueError(f"{name} must have shape [{n}], got {tuple(value.shape)}")
        if self.curves.dim() != 2 or self.curves.shape[0] != n:
            raise ValueError(f"curves must be [{n}, L], got {tuple(self.curves.shape)}")
        if (self.weight_index is None) != (self.weights is None):
            raise ValueError("weight_index and weights must be given together")
        if self.reference_index is not None:
            if self.weights is None:
                raise ValueError("reference_index needs weights")
            m = len(self.weights)
            if self.reference_index.shape != (m,) or self.reference_index.dtype != torch.long:
                raise ValueError(
                    f"reference_index must be a long tensor of shape [{m}], got {self.reference_index.dtype} "
                    f"{tuple(self.reference_index.shape)}"
                )
            if m and (int(self.reference_index.min()) < 0 or int(self.reference_index.max()) >= m):
                raise ValueError(f"reference_index must index into the {m} weights")

    def to(self, device: torch.device | str) -> SurrogateRows:
        """Return a copy with every tensor on ``device`` (modules stay where they are)."""
        return SurrogateRows(
            x=self.x.to(device),
            budget=self.budget.to(device),
            curves=self.curves.to(device),
            curve_lengths=self.curve_lengths.to(device),
            weight_index=None if self.weight_index is None else self.weight_index.to(device),
            weights=self.weights,
            weight_keys=self.weight_keys,
            reference_index=None if self.reference_index is None else self.reference_index.to(device),
        )


class Surrogate(ABC):
    """A model of the score of a configuration at an epoch, given what the rows show.

    Implementations must be deterministic for a given ``seed`` and state, hold only tensors, lists,
    dicts and scalars in ``state_dict()``, and never raise on numerical failure (recover by jitter or
    a fresh fit; as a last resort answer with the prior).
    """

    @abstractmethod
    def fit(self, rows: SurrogateRows, targets: Tensor, seed: int) -> None:
        """Condition on observed rows.

        Args:
            rows: ``N`` training rows.
            targets: Observed scores, shape ``[N]``.
            seed: Seeds every random choice of this fit.
        """

    @abstractmethod
    def posterior(self, rows: SurrogateRows) -> tuple[Tensor, Tensor]:
        """Predict the score of ``M`` candidate rows.

        Returns:
            ``(mean, variance)``, each of shape ``[M]``, in the units of the targets, on the CPU.
        """

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (tensors, lists, dicts and scalars only)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
