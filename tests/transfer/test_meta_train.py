"""Meta-training over tasks, the prior's parameter layout, and starting fresh fits from given parameters."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fms.search.space import SearchSpace
from lightning_fms.surrogate._base import SurrogateRows
from lightning_fms.surrogate.additive_gp import AdditiveGPSurrogate
from lightning_fms.surrogate.deep_kernel import DeepKernelSurrogate
from lightning_fms.transfer.columns import FRACTION_COLUMN, encoded_column_names
from lightning_fms.transfer.layout import TAIL, assemble, column_key, split, trainable_state
from lightning_fms.transfer.meta_train import MetaTask, meta_train

CAP = 8


def _task(name: str, entries: int, seed: int, n: int = 240, shift: float = 0.0) -> MetaTask:
    """Rows of a synthetic family of tasks: one shared response surface, per-entry offsets, rising curves."""
    g = torch.Generator().manual_seed(seed)
    d = entries + 2
    x = torch.zeros(n, d, dtype=torch.float64)
    hub = torch.randint(entries, (n,), generator=g)
    x[torch.arange(n), hub] = 1.0
    x[:, entries:] = torch.rand(n, 2, generator=g, dtype=torch.float64)
    k = torch.randint(1, CAP + 1, (n,), generator=g)
    budget = k.double() / CAP
    level = torch.sin(5 * x[:, entries]) + 0.3 * hub.double() / entries + shift
    y = level + budget + 0.03 * torch.randn(n, generator=g, dtype=torch.float64)
    steps = torch.arange(1, CAP + 1, dtype=torch.float64) / CAP
    curves = (level.unsqueeze(-1) + steps.unsqueeze(0)) * (torch.arange(CAP).unsqueeze(0) < (k - 1).unsqueeze(-1))
    columns = [f"hub=e{j}" for j in range(entries)] + ["model.lr", "model.momentum"]
    rows = SurrogateRows(x=x, budget=budget, curves=curves, curve_lengths=k - 1)
    return MetaTask(name, rows, y, columns, "hub=")


def _additive(x_dim: int) -> AdditiveGPSurrogate:
    return AdditiveGPSurrogate(x_dim=x_dim, curve_length=CAP, device="cpu")


def test_column_names_follow_the_encoding() -> None:
    space = SearchSpace.from_dict(
        {
            "hub": {"type": "hub"},
            "model.lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
            "data.batch_size": {"type": "categorical", "choices": [16, 32]},
        },
        hub_entries=["a", "b"],
    )
    assert encoded_column_names(space) == ["hub=a", "hub=b", "model.lr", "data.batch_size=16", "data.batch_size=32"]
    assert encoded_column_names(space, frozen_layers=True)[-1] == FRACTION_COLUMN


def test_split_and_assemble_carry_columns_by_name_and_hub_entries_by_their_mean() -> None:
    lengthscale = torch.tensor([[1.0, 2.0, 3.0, 9.0]])  # hub=a, hub=b, model.lr | budget
    flat = split({"ls": lengthscale, "noise": torch.tensor([0.5])}, {"ls": 1}, ["hub=a", "hub=b", "model.lr"])
    assert set(flat) == {
        "noise",
        column_key("ls", "hub=a"),
        column_key("ls", "hub=b"),
        column_key("ls", "model.lr"),
        column_key("ls", TAIL),
    }
    reference = {"ls": torch.full((1, 5), -7.0), "noise": torch.tensor([0.1])}
    out = assemble(flat, reference, {"ls": 1}, ["model.lr", "hub=b", "hub=c", "model.extra"], "hub=")
    # model.lr and hub=b by name; the unseen entry hub=c at the mean of the known entries; an unknown non-hub column
    # keeps the model's own value; the budget's tail as learned
    assert out["ls"].tolist() == [[3.0, 2.0, 1.5, -7.0, 9.0]]
    assert out["noise"].tolist() == [0.5]


def test_meta_training_improves_the_held_out_likelihood_of_a_related_task() -> None:
    tasks = [_task("a", 3, 1), _task("b", 4, 2), _task("c", 3, 3)]
    held_out = _task("d", 5, 4, shift=0.5)
    result = meta_train(_additive, tasks, held_out, steps=120, batch_rows=96, learning_rate=0.02, eval_every=40)
    assert result.best_step > 0
    assert result.best_validation_nll < result.initial_validation_nll - 0.3
    assert [h["step"] for h in result.history] == [0, 40, 80, 120]
    # the parameters are in the space-independent layout: one slice per column name seen, plus the budget's tail
    names = {k.split("@", 1)[1] for k in result.parameters if "@" in k}
    assert {"hub=e0", "hub=e4", "model.lr", "model.momentum", TAIL} <= names


def test_meta_training_is_deterministic_for_a_seed() -> None:
    tasks = [_task("a", 3, 1), _task("b", 4, 2)]
    first = meta_train(_additive, tasks, None, steps=15, batch_rows=64, seed=5)
    second = meta_train(_additive, tasks, None, steps=15, batch_rows=64, seed=5)
    assert first.parameters.keys() == second.parameters.keys()
    for key in first.parameters:
        assert torch.equal(first.parameters[key], second.parameters[key]), key
    assert math.isnan(first.initial_validation_nll)


def test_deep_kernel_meta_trains_its_extractor_across_spaces() -> None:
    def deep(x_dim: int) -> DeepKernelSurrogate:
        return DeepKernelSurrogate(x_dim=x_dim, curve_length=CAP, device="cpu", hidden=16, output_dim=16)

    result = meta_train(
        deep, [_task("a", 3, 1), _task("b", 4, 2)], _task("d", 5, 4), steps=60, batch_rows=64, eval_every=20
    )
    assert result.best_validation_nll < result.initial_validation_nll
    assert column_key("extractor.hp.0.weight", "hub=e3") in result.parameters
    assert result.parameters[column_key("extractor.hp.0.weight", TAIL)].shape == (16, 1)  # the budget's column


def test_fresh_fits_start_from_initial_parameters_and_refuse_foreign_ones() -> None:
    task = _task("a", 3, 1, n=60)
    surrogate = _additive(5)
    probe = trainable_state(surrogate._probe_model())
    noise_name = "likelihood.noise_covar.raw_noise"
    given = {noise_name: torch.tensor([-3.0], dtype=torch.float64)}
    surrogate.set_initial_parameters(given)
    surrogate.full_fit_steps = 0  # no training: the fitted model is exactly where the fit started
    surrogate.fit(task.rows, task.targets, seed=0)
    assert surrogate._model is not None
    assert float(surrogate._model.state_dict()[noise_name]) == -3.0
    assert float(probe[noise_name]) != -3.0
    with pytest.raises(ValueError, match="not a parameter"):
        surrogate.set_initial_parameters({"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        surrogate.set_initial_parameters({noise_name: torch.zeros(3)})
