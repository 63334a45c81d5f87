"""Candidate posteriors kept for the decisions that score with the same fitted surrogate.

While a surrogate refits in the background, the driver's decisions score with the surrogate as last fitted
(:meth:`~lightning_fms.search.searcher.SurrogateSearcher.select_with_current_fit`). A paused trial's candidate row
(its configuration, next epoch, curve so far and latest weights) does not change until the trial trains again, so
under one fit its posterior does not change either: scoring every paused trial again at every decision is work
done twice. At 256 simulated workers it was the largest part of a decision (docs/ray.md, "Scale: the central
decider"). :class:`PosteriorCache` keeps each candidate's posterior for the surrogate it was computed with, so a
decision computes only the rows it has not seen under that surrogate (the fresh configurations, and the trials
that trained since).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from lightning_fms.search.rows import Candidate
from lightning_fms.search.trial import config_key

__all__ = ["PosteriorCache", "candidate_key"]


def candidate_key(candidate: Candidate) -> Hashable:
    """What a candidate's row depends on: the paused trial and its next epoch, or the fresh configuration."""
    if candidate.trial_id is not None:
        return ("trial", candidate.trial_id, candidate.epoch, candidate.fraction)
    return ("fresh", config_key(candidate.config), candidate.fraction)


class PosteriorCache:
    """Posterior mean and variance per candidate, valid for one fitted surrogate (see the module docstring)."""

    def __init__(self) -> None:
        self._owner: object | None = None
        self._scores: dict[Hashable, tuple[float, float]] = {}

    def clear(self) -> None:
        """Forget every posterior (the surrogate was fitted again or replaced)."""
        self._owner = None
        self._scores.clear()

    def __len__(self) -> int:
        return len(self._scores)

    def posterior(
        self,
        surrogate: object,
        candidates: Sequence[Candidate],
        compute: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior of every candidate under ``surrogate``, computing only the ones not kept for it.

        Args:
            surrogate: The fitted surrogate the posteriors belong to (another one than last time clears the cache).
            candidates: ``M`` candidates.
            compute: ``positions -> (mean, variance)`` of those candidates, each ``[len(positions)]``.

        Returns:
            ``(mean, variance)``, each ``[M]`` float64, in the order of ``candidates``.
        """
        if surrogate is not self._owner:
            self.clear()
            self._owner = surrogate
        keys = [candidate_key(c) for c in candidates]
        missing = [i for i, key in enumerate(keys) if key not in self._scores]
        if missing:
            mean, variance = compute(missing)
            for i, m, v in zip(missing, mean.tolist(), variance.tolist(), strict=True):
                self._scores[keys[i]] = (m, v)
        values = torch.tensor([self._scores[key] for key in keys], dtype=torch.float64).reshape(len(keys), 2)
        return values[:, 0], values[:, 1]
