"""Row alignment: turning trials and candidates into surrogate rows without leaking the future.

The row that predicts epoch ``k`` of a configuration sees:

* the configuration (encoded to the unit cube),
* the budget ``k / cap``,
* the scores of epochs ``1 .. k-1`` (never epoch ``k`` itself),
* the weights after epoch ``k-1``: for ``k == 1`` the pretrained weights of the configuration's hub
  entry (free in a model-hub setting), else the trial's snapshot after epoch ``k-1``.

Training rows are every observed (trial, epoch); a paused trial's candidate row predicts epoch ``b+1``
from ``y_1 .. y_b`` and ``W_b``; a fresh configuration's row predicts epoch 1 from an empty curve and
its hub entry's pretrained weights. Upstream FMS paired every row with the *latest* checkpoint and
gave unstarted configurations the checkpoint after epoch 1; neither happens here.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_fms.search.space import SearchSpace
from lightning_fms.search.trial import Trial, to_score
from lightning_fms.surrogate._base import SurrogateRows

WeightKey = tuple[Hashable, ...]
ModuleProvider = Callable[[WeightKey, dict[str, Any]], nn.Module]


@dataclass(frozen=True)
class Candidate:
    """A possible next step: train ``epoch`` of ``trial_id``, or of a fresh configuration when ``trial_id`` is None.

    ``fraction`` is the share of layer units trainable in that epoch and ``cost`` what the epoch is charged in
    full-epoch equivalents (both 1 unless the frozen-layer fidelity is on, see :mod:`lightning_fms.frozen.levels`).
    """

    trial_id: int | None
    config: dict[str, Any]
    epoch: int
    fraction: float = 1.0
    cost: float = 1.0


@dataclass(frozen=True)
class RowSpec:
    """One row before encoding: predict ``epoch`` of ``config`` from ``curve`` (scores before it) and ``weight_key``.

    ``fraction`` is the trainable fraction of layer units in that epoch (1 without the frozen-layer fidelity).
    """

    config: dict[str, Any]
    epoch: int
    curve: tuple[float, ...]
    weight_key: WeightKey
    fraction: float = 1.0


def pretrained_key(space: SearchSpace, config: dict[str, Any]) -> WeightKey:
    """Key of the pretrained weights a configuration starts from."""
    return ("hub", str(config[space.hub_key]) if space.hub_key else "")


def weight_key_before(space: SearchSpace, trial_id: int, config: dict[str, Any], epoch: int) -> WeightKey:
    """Key of the weights a row predicting ``epoch`` may see: those after ``epoch - 1``."""
    if epoch <= 1:
        return pretrained_key(space, config)
    return ("trial", trial_id, epoch - 1)


def training_specs(space: SearchSpace, trials: Sequence[Trial], mode: str) -> tuple[list[RowSpec], list[float]]:
    """One row per observed epoch of every trial, with its score as target.

    A running trial contributes the epochs it has completed (the one in flight is a pending row, see
    :attr:`~lightning_fms.search.searcher.SelectionContext.pending`).
    """
    specs: list[RowSpec] = []
    targets: list[float] = []
    for trial in trials:
        scores = [to_score(v, mode) for v in trial.values]
        for k, score in enumerate(scores, start=1):
            if score == -float("inf"):
                break
            key = weight_key_before(space, trial.id, trial.config, k)
            specs.append(RowSpec(trial.config, k, tuple(scores[: k - 1]), key, trial.fraction_of(k)))
            targets.append(score)
    return specs, targets


def candidate_specs(
    space: SearchSpace, candidates: Sequence[Candidate], trials: dict[int, Trial], mode: str
) -> list[RowSpec]:
    """Rows that predict each candidate's next epoch from what has been paid for."""
    specs = []
    for cand in candidates:
        if cand.trial_id is None:
            specs.append(RowSpec(cand.config, 1, (), pretrained_key(space, cand.config), cand.fraction))
            continue
        trial = trials[cand.trial_id]
        if cand.epoch != trial.epochs + 1:
            raise ValueError(f"candidate for trial {trial.id} must be epoch {trial.epochs + 1}, got {cand.epoch}")
        scores = tuple(to_score(v, mode) for v in trial.values)
        key = weight_key_before(space, trial.id, trial.config, cand.epoch)
        specs.append(RowSpec(trial.config, cand.epoch, scores, key, cand.fraction))
    return specs


def encode_rows(
    space: SearchSpace,
    specs: Sequence[RowSpec],
    cap: int,
    modules: ModuleProvider | None = None,
    fraction_feature: bool = False,
) -> SurrogateRows:
    """Encode row specs into a :class:`SurrogateRows` batch.

    Args:
        space: The search space (encodes configurations).
        specs: ``N`` rows.
        cap: The per-trial epoch cap ``L`` (curve width and budget scale).
        modules: Returns the module (architecture + weights) for a weight key; ``None`` leaves weights out.
            With modules, the hub entries' pretrained modules the rows' runs started from are added to
            ``weights`` (after the rows' own) and ``reference_index`` points each entry at its run's.
        fraction_feature: Append each row's trainable fraction as a last column of ``x`` (the
            frozen-layer fidelity's coordinate).

    Returns:
        Rows with ``x`` ``[N, space.dim]`` (``[N, space.dim + 1]`` with ``fraction_feature``), ``budget``
        ``[N]``, ``curves`` ``[N, cap]``.
    """
    n = len(specs)
    x = space.encode_many([s.config for s in specs]).float()
    if fraction_feature:
        x = torch.cat([x, torch.tensor([[s.fraction] for s in specs], dtype=torch.float32).reshape(n, 1)], dim=1)
    budget = torch.tensor([s.epoch / cap for s in specs], dtype=torch.float32)
    curves = torch.zeros(n, cap, dtype=torch.float32)
    lengths = torch.zeros(n, dtype=torch.long)
    for i, spec in enumerate(specs):
        if spec.curve:
            curves[i, : len(spec.curve)] = torch.tensor(spec.curve, dtype=torch.float32)
        lengths[i] = len(spec.curve)
    if modules is None:
        return SurrogateRows(x=x, budget=budget, curves=curves, curve_lengths=lengths)
    keys: list[WeightKey] = []
    index_of: dict[WeightKey, int] = {}
    weights: list[nn.Module] = []

    def index(key: WeightKey, config: dict[str, Any]) -> int:
        if key not in index_of:
            index_of[key] = len(keys)
            keys.append(key)
            weights.append(modules(key, config))
        return index_of[key]

    weight_index = torch.tensor([index(s.weight_key, s.config) for s in specs], dtype=torch.long).reshape(n)
    # every run's starting point (W_0) joins the modules, after those the rows refer to
    reference_of = {s.weight_key: index(pretrained_key(space, s.config), s.config) for s in specs}
    reference_index = torch.tensor([reference_of.get(k, i) for i, k in enumerate(keys)], dtype=torch.long)
    return SurrogateRows(
        x=x,
        budget=budget,
        curves=curves,
        curve_lengths=lengths,
        weight_index=weight_index,
        weights=weights,
        weight_keys=keys,
        reference_index=reference_index.reshape(len(keys)),
    )
