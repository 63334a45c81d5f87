"""Meta-training: one set of surrogate parameters fitted by marginal likelihood over earlier tasks (FSBO-style).

Each step draws one source task and a batch of its rows, standardises that task's targets (and curves) by the
task's own mean and standard deviation, lays the shared parameters onto the task's space
(:func:`~lightning_fms.transfer.layout.assemble`) and takes one Adam step on the exact negative marginal
log-likelihood per row. Every ``eval_every`` steps the same likelihood is measured on fixed batches of a held-out
source task; the parameters with the best held-out likelihood are kept (the step-0 value, the default
initialisation, is recorded too, so that the record shows whether meta-training helped at all).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gpytorch
import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_fms.surrogate._base import SurrogateRows
from lightning_fms.surrogate.exact_gp import ExactGPModel, ExactGPSurrogateBase
from lightning_fms.surrogate.numerics import gp_settings, seeded, standardiser
from lightning_fms.transfer.layout import assemble, split, trainable_state

#: ``x_dim -> surrogate``: builds the surrogate being meta-trained for a task's space.
SurrogateFactory = Callable[[int], ExactGPSurrogateBase]


@dataclass
class MetaTask:
    """One source task as meta-training reads it.

    Attributes:
        name: The task's name.
        rows: Its ``R`` rows (``x [R, D]``, budgets, curves of scores; ``weights`` unused).
        targets: ``[R]`` scores the rows predict.
        columns: The ``D`` encoded column names of its space.
        hub_prefix: ``"<hub key>="`` (``None`` without a hub choice).
        weight_features: ``[R, E]`` weight features of each row (``None`` for a surrogate without a weight term).
    """

    name: str
    rows: SurrogateRows
    targets: Tensor
    columns: list[str]
    hub_prefix: str | None
    weight_features: Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, index: Tensor) -> tuple[SurrogateRows, Tensor, Tensor | None]:
        """Rows, targets and weight features of the rows at ``index`` (``[B]`` long)."""
        r = self.rows
        rows = SurrogateRows(
            x=r.x[index], budget=r.budget[index], curves=r.curves[index], curve_lengths=r.curve_lengths[index]
        )
        features = None if self.weight_features is None else self.weight_features[index]
        return rows, self.targets[index], features


@dataclass
class MetaTrainResult:
    """What meta-training produced.

    Attributes:
        parameters: The chosen parameters in the prior's layout (:func:`~lightning_fms.transfer.layout.split`).
        column_axes: The column tensors (state-dict name -> axis).
        history: ``{step, train_nll, validation_nll}`` per evaluation.
        best_step: The step whose parameters were kept (0: the default initialisation was best).
        initial_validation_nll: Held-out negative log-likelihood per row of the default initialisation.
        best_validation_nll: That of the kept parameters.
        seconds: Wall time.
    """

    parameters: dict[str, Tensor]
    column_axes: dict[str, int]
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0
    initial_validation_nll: float = math.nan
    best_validation_nll: float = math.nan
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Plain-data record (for the prior's metadata)."""
        return {
            "best_step": self.best_step,
            "initial_validation_nll": self.initial_validation_nll,
            "best_validation_nll": self.best_validation_nll,
            "seconds": self.seconds,
            "history": self.history,
        }


class _NegativeMLL(nn.Module):
    """``(packed [N, P], y [N]) -> -mll / N`` of a model (so that ``functional_call`` can swap its parameters)."""

    def __init__(self, model: ExactGPModel) -> None:
        super().__init__()
        self.model = model
        self.mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)

    def forward(self, packed: Tensor, y: Tensor) -> Tensor:
        self.model.set_train_data(inputs=packed, targets=y, strict=False)
        return -self.mll(self.model(packed), y)


@dataclass
class _Prepared:
    task: MetaTask
    surrogate: ExactGPSurrogateBase
    loss: _NegativeMLL
    reference: dict[str, Tensor]
    column_axes: dict[str, int]
    mu: float
    std: float


def _prepare(task: MetaTask, make_surrogate: SurrogateFactory, seed: int) -> _Prepared:
    surrogate = make_surrogate(len(task.columns))
    mu, std = standardiser(task.targets)
    rows, targets, features = task.subset(torch.arange(min(len(task), 2)))
    packed = surrogate.pack_features(rows, mu, std, features)
    y = ((targets - mu) / std).to(surrogate.dtype)
    with seeded(seed, surrogate.device):
        model = surrogate._build_model(packed, y)  # noqa: SLF001 (meta-training builds the surrogate's own model)
    model.train()
    return _Prepared(
        task, surrogate, _NegativeMLL(model), trainable_state(model), surrogate.x_column_parameters(), mu, std
    )


def _batch_loss(prepared: _Prepared, flat: dict[str, Tensor], index: Tensor) -> Tensor:
    task, surrogate = prepared.task, prepared.surrogate
    rows, targets, features = task.subset(index)
    packed = surrogate.pack_features(rows, prepared.mu, prepared.std, features)
    y = ((targets.to(torch.float64) - prepared.mu) / prepared.std).to(packed.dtype)
    state = assemble(flat, prepared.reference, prepared.column_axes, task.columns, task.hub_prefix)
    state = {f"model.{name}": value for name, value in state.items()}
    return functional_call(prepared.loss, state, (packed, y), strict=False)


def meta_train(
    make_surrogate: SurrogateFactory,
    tasks: Sequence[MetaTask],
    validation: MetaTask | None,
    *,
    steps: int = 1000,
    batch_rows: int = 256,
    learning_rate: float = 0.01,
    eval_every: int = 50,
    eval_batches: int = 4,
    seed: int = 0,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> MetaTrainResult:
    """Fit one set of surrogate parameters to every source task's rows by marginal likelihood.

    Args:
        make_surrogate: Builds the surrogate for a task's ``x_dim`` (the same class and options the study uses).
        tasks: The training tasks (at least one).
        validation: The held-out source task that chooses the checkpoint (``None``: keep the last parameters).
        steps: Adam steps (one task and one batch each); the learning rate follows a cosine to 1/100.
        batch_rows: Rows per step (all of a task's rows when it has fewer).
        learning_rate: Adam's initial learning rate.
        eval_every: Steps between held-out evaluations.
        eval_batches: Fixed held-out batches averaged per evaluation.
        seed: Seeds the initialisation and the draws of tasks and rows.
        progress: Called after every step with ``(step, {"train_nll": ...})`` (and the held-out value when measured).

    Returns:
        The chosen parameters and the record of training.

    Raises:
        ValueError: no task, or a task with fewer than two rows.
    """
    if not tasks:
        raise ValueError("meta-training needs at least one source task")
    for task in [*tasks, *([validation] if validation is not None else [])]:
        if len(task) < 2:
            raise ValueError(f"source task {task.name!r} has {len(task)} rows; meta-training needs at least 2")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    with gp_settings(0.0):
        prepared = [_prepare(task, make_surrogate, seed) for task in tasks]
        held_out = _prepare(validation, make_surrogate, seed) if validation is not None else None
        flat: dict[str, Tensor] = {}
        trainable: set[str] = set()
        for item in [*prepared, *([held_out] if held_out is not None else [])]:
            names = {n for n, _ in item.loss.model.named_parameters()}
            pieces = split(item.reference, item.column_axes, item.task.columns)
            for key, value in pieces.items():
                if key not in flat:
                    flat[key] = value.detach().clone()
                    if key.split("@", 1)[0] in names:
                        trainable.add(key)
        parameters = {k: nn.Parameter(v) for k, v in flat.items() if k in trainable}
        store: dict[str, Tensor] = {**flat, **parameters}
        optimiser = torch.optim.Adam(list(parameters.values()), lr=learning_rate)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimiser, T_max=max(1, steps), eta_min=learning_rate / 100
        )

        fixed: list[Tensor] = []
        if held_out is not None:
            eval_rng = np.random.default_rng(seed + 1)
            n = len(held_out.task)
            fixed = [
                torch.as_tensor(np.sort(eval_rng.choice(n, size=min(batch_rows, n), replace=False)))
                for _ in range(eval_batches)
            ]

        def evaluate() -> float:
            if held_out is None:
                return math.nan
            with torch.no_grad():
                values = [float(_batch_loss(held_out, store, index)) for index in fixed]
            return float(np.mean(values))

        initial = evaluate()
        best_value, best_step = initial, 0
        best = {k: v.detach().clone() for k, v in store.items()}
        history: list[dict[str, float]] = [{"step": 0, "train_nll": math.nan, "validation_nll": initial}]
        recent: list[float] = []
        for step in range(1, steps + 1):
            item = prepared[int(rng.integers(len(prepared)))]
            n = len(item.task)
            index = torch.as_tensor(np.sort(rng.choice(n, size=min(batch_rows, n), replace=False)))
            optimiser.zero_grad(set_to_none=True)
            loss = _batch_loss(item, store, index)
            if not bool(torch.isfinite(loss)):
                continue  # a singular batch: skip it rather than poison the shared parameters
            loss.backward()
            optimiser.step()
            schedule.step()
            recent.append(float(loss.detach()))
            record = {"train_nll": float(np.mean(recent[-eval_every:]))}
            if step % eval_every == 0 or step == steps:
                value = evaluate()
                record["validation_nll"] = value
                history.append({"step": step, **record})
                if held_out is None or (math.isfinite(value) and value < best_value):
                    best_value, best_step = value, step
                    best = {k: v.detach().clone() for k, v in store.items()}
            if progress is not None:
                progress(step, record)
    return MetaTrainResult(
        parameters=best,
        column_axes=dict(prepared[0].column_axes),
        history=history,
        best_step=best_step,
        initial_validation_nll=initial,
        best_validation_nll=best_value,
        seconds=time.perf_counter() - start,
    )


__all__ = ["MetaTask", "MetaTrainResult", "SurrogateFactory", "meta_train"]
