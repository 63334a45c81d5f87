"""Pretraining a weight trunk on targets that look ahead: what a checkpoint says about where its run will end.

The trunk maps a checkpoint's weight features (by default the 20 statistics of
:mod:`lightning_fms.weights.summary`) to a few numbers. It is trained with a small head that also sees the
epoch and the current value, on the target ``(y_final - y_current) / std`` of each source task (standardised per
task; ``y_current`` is the last observed value, the task's mean before the first epoch): so it must say how much
further a run goes, not how good it is now, which the curve already shows. The checkpoint is chosen by the
held-out source task's error; the same head trained without the trunk's output is the reference that shows
what the weights add. At study time the trunk is frozen behind the study's featurizer
(:class:`PretrainedFeaturizer`) and its output is what the surrogate's weight term reads.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_fms.weights.base import Featurizer


def signed_log(values: Tensor) -> Tensor:
    """``sign(v) * log(1 + |v|)``: weight statistics span orders of magnitude (max ``|w|``, relative change)."""
    return torch.sign(values) * torch.log1p(values.abs())


class WeightTrunk(nn.Module):
    """Weight features ``[N, F]`` -> embedding ``[N, K]``: signed log, standardisation, a two-layer MLP.

    Args:
        input_dim: ``F``, the featurizer's output width.
        embedding_dim: ``K``.
        hidden: Units of the hidden layer.
    """

    def __init__(self, input_dim: int, embedding_dim: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        self.embedding_dim = int(embedding_dim)
        self.hidden = int(hidden)
        self.register_buffer("input_mean", torch.zeros(self.input_dim, dtype=torch.float64))
        self.register_buffer("input_std", torch.ones(self.input_dim, dtype=torch.float64))
        self.net = nn.Sequential(
            nn.Linear(self.input_dim, self.hidden), nn.SiLU(), nn.Linear(self.hidden, self.embedding_dim)
        )
        self.double()

    def set_standardisation(self, features: Tensor) -> None:
        """Standardise inputs by the mean and spread of ``signed_log(features)`` (``[N, F]``, the training rows)."""
        z = signed_log(features.to(torch.float64))
        std = z.std(dim=0) if z.shape[0] > 1 else torch.ones(self.input_dim, dtype=torch.float64)
        self.input_mean.copy_(z.mean(dim=0))
        self.input_std.copy_(torch.where(std > 1e-12, std, torch.ones_like(std)))

    def forward(self, features: Tensor) -> Tensor:
        """Embed ``[N, F]`` features as ``[N, K]`` (float64)."""
        z = (signed_log(features.to(self.input_mean.dtype)) - self.input_mean) / self.input_std
        return self.net(z)


class LookaheadHead(nn.Module):
    """``[embedding (K), budget, current value, has a current value] -> look-ahead target`` (training only)."""

    def __init__(self, embedding_dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embedding_dim + 3, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.double()

    def forward(self, embedding: Tensor, context: Tensor) -> Tensor:
        """``[N, K]`` and ``[N, 3]`` -> ``[N]``."""
        return self.net(torch.cat([embedding, context], dim=-1)).squeeze(-1)


@dataclass
class LookaheadTask:
    """One source task's rows for the look-ahead pretraining.

    Attributes:
        name: The task's name.
        features: ``[R, F]`` weight features of the checkpoint each row sees (``W_{k-1}``).
        context: ``[R, 3]``: the budget ``k / E``, the standardised current value (0 before the first epoch) and
            whether there is one.
        target: ``[R]`` standardised ``y_final - y_current``.
    """

    name: str
    features: Tensor
    context: Tensor
    target: Tensor

    def __len__(self) -> int:
        return int(self.target.shape[0])


def lookahead_task(
    name: str, features: Tensor, budget: Tensor, curves: Tensor, curve_lengths: Tensor, final: Tensor
) -> LookaheadTask:
    """Build a task's look-ahead rows from surrogate-style rows.

    Args:
        name: The task's name.
        features: ``[R, F]`` weight features of ``W_{k-1}``.
        budget: ``[R]`` ``k / E``.
        curves: ``[R, E]`` scores before epoch ``k``.
        curve_lengths: ``[R]`` ``k - 1``.
        final: ``[R]`` the score at the configuration's last observed epoch.
    """
    final = final.to(torch.float64)
    mu = float(final.mean())
    std = float(final.std()) if final.numel() > 1 else 1.0
    std = std if math.isfinite(std) and std > 1e-12 else 1.0
    lengths = curve_lengths.to(torch.long)
    has = lengths > 0
    last = curves.to(torch.float64).gather(1, (lengths - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    current = torch.where(has, last, torch.full_like(last, mu))
    context = torch.stack([budget.to(torch.float64), (current - mu) / std, has.to(torch.float64)], dim=-1)
    return LookaheadTask(name, features.to(torch.float64), context, (final - current) / std)


@dataclass
class TrunkResult:
    """What the look-ahead pretraining produced.

    Attributes:
        trunk: The chosen trunk (eval mode, gradients off).
        best_step: The step whose trunk was kept.
        best_validation_mse: Held-out mean squared error (standardised units) of the kept trunk and head.
        validation_mse_without_weights: The same head trained on the context alone: the reference.
        history: ``{step, train_mse, validation_mse}`` per evaluation.
        seconds: Wall time.
    """

    trunk: WeightTrunk
    best_step: int
    best_validation_mse: float
    validation_mse_without_weights: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Plain-data record (for the prior's metadata)."""
        return {
            "best_step": self.best_step,
            "best_validation_mse": self.best_validation_mse,
            "validation_mse_without_weights": self.validation_mse_without_weights,
            "seconds": self.seconds,
            "history": self.history,
        }


def _train_head(
    tasks: Sequence[LookaheadTask],
    validation: LookaheadTask | None,
    trunk: WeightTrunk | None,
    embedding_dim: int,
    *,
    steps: int,
    batch_rows: int,
    learning_rate: float,
    weight_decay: float,
    eval_every: int,
    seed: int,
    progress: Callable[[int, dict[str, float]], None] | None,
) -> tuple[WeightTrunk | None, int, float, list[dict[str, float]]]:
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LookaheadHead(embedding_dim)
    modules = nn.ModuleList([head] + ([trunk] if trunk is not None else []))
    optimiser = torch.optim.AdamW(modules.parameters(), lr=learning_rate, weight_decay=weight_decay)

    def predict(task: LookaheadTask, index: Tensor | slice) -> Tensor:
        context = task.context[index]
        embedding = (
            trunk(task.features[index]) if trunk is not None else context.new_zeros(context.shape[0], embedding_dim)
        )
        return head(embedding, context)

    def evaluate() -> float:
        if validation is None:
            return math.nan
        with torch.no_grad():
            return float((predict(validation, slice(None)) - validation.target).square().mean())

    best_value, best_step = evaluate(), 0
    best = copy.deepcopy(trunk.state_dict()) if trunk is not None else None
    history: list[dict[str, float]] = [{"step": 0, "train_mse": math.nan, "validation_mse": best_value}]
    recent: list[float] = []
    for step in range(1, steps + 1):
        task = tasks[int(rng.integers(len(tasks)))]
        index = torch.as_tensor(rng.choice(len(task), size=min(batch_rows, len(task)), replace=False))
        optimiser.zero_grad(set_to_none=True)
        loss = (predict(task, index) - task.target[index]).square().mean()
        loss.backward()
        optimiser.step()
        recent.append(float(loss.detach()))
        record = {"train_mse": float(np.mean(recent[-eval_every:]))}
        if step % eval_every == 0 or step == steps:
            value = evaluate()
            record["validation_mse"] = value
            history.append({"step": step, **record})
            if validation is None or value < best_value:
                best_value, best_step = value, step
                best = copy.deepcopy(trunk.state_dict()) if trunk is not None else None
        if progress is not None:
            progress(step, record)
    if trunk is not None and best is not None:
        trunk.load_state_dict(best)
    return trunk, best_step, best_value, history


def pretrain_trunk(
    tasks: Sequence[LookaheadTask],
    validation: LookaheadTask | None,
    *,
    embedding_dim: int = 8,
    hidden: int = 32,
    steps: int = 1500,
    batch_rows: int = 512,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-4,
    eval_every: int = 100,
    seed: int = 0,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> TrunkResult:
    """Train a :class:`WeightTrunk` (with a throw-away head) on the tasks' look-ahead targets.

    Args:
        tasks: Training tasks (at least one, each with rows).
        validation: The held-out source task choosing the checkpoint (``None``: keep the last).
        embedding_dim: The trunk's output width ``K``.
        hidden: Hidden units of trunk and head.
        steps: AdamW steps, one task and batch each.
        batch_rows: Rows per step.
        learning_rate: AdamW's learning rate.
        weight_decay: AdamW's weight decay.
        eval_every: Steps between held-out evaluations.
        seed: Seeds initialisation and sampling.
        progress: Called after every step with ``(step, record)``.

    Raises:
        ValueError: no task or an empty one.
    """
    if not tasks or any(len(t) == 0 for t in tasks):
        raise ValueError("look-ahead pretraining needs at least one source task with rows")
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = WeightTrunk(int(tasks[0].features.shape[1]), embedding_dim, hidden)
    trunk.set_standardisation(torch.cat([t.features for t in tasks]))
    options = dict(
        steps=steps,
        batch_rows=batch_rows,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        eval_every=eval_every,
        seed=seed,
    )
    trained, best_step, best_value, history = _train_head(
        tasks, validation, trunk, embedding_dim, progress=progress, **options
    )
    _, _, without, _ = _train_head(tasks, validation, None, embedding_dim, progress=None, **options)
    assert trained is not None
    trained.eval().requires_grad_(False)
    return TrunkResult(trained, best_step, best_value, without, history, time.perf_counter() - start)


class PretrainedFeaturizer(Featurizer):
    """A study's featurizer behind a frozen pretrained trunk: ``trunk(base(modules, keys, references))``.

    The base featurizer caches its rows by key, so a decision computes each checkpoint's features once.

    Args:
        base: The featurizer the study's ``weights`` setting names (its output width is the trunk's input).
        trunk: The pretrained trunk (frozen here).

    Raises:
        ValueError: the widths do not match.
    """

    def __init__(self, base: Featurizer, trunk: WeightTrunk) -> None:
        if int(base.embedding_dim) != trunk.input_dim:
            raise ValueError(f"the trunk reads {trunk.input_dim} features, the featurizer gives {base.embedding_dim}")
        super().__init__(trunk.embedding_dim)
        self.base = base
        self.trunk = trunk.eval().requires_grad_(False)
        self.double()

    def forward(
        self,
        modules: Sequence[nn.Module],
        keys: Sequence[Hashable] | None = None,
        references: Sequence[nn.Module] | None = None,
    ) -> Tensor:
        """``[B, K]`` embeddings of ``B`` modules (see :meth:`Featurizer.forward`)."""
        with torch.no_grad():
            features = self.base(modules, keys, references=references)
            return self.trunk(features.to(torch.float64)).to(self.dtype)


__all__ = [
    "LookaheadHead",
    "LookaheadTask",
    "PretrainedFeaturizer",
    "TrunkResult",
    "WeightTrunk",
    "lookahead_task",
    "pretrain_trunk",
    "signed_log",
]
