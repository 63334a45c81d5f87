from __future__ import annotations

import io
import logging
import math

import gpytorch
import pytest
import torch
from torch import Tensor, nn

from lightning_fms.surrogate import DeepKernelSurrogate, SurrogateRows, exact_gp

CAP = 8
X_DIM = 3
FAST = {"full_fit_steps": 80, "refine_steps": 8, "learning_rate": 1e-2, "device": "cpu"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small GPs gain nothing from intra-op threads and slow down badly when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def score(x0: Tensor, epoch: Tensor) -> Tensor:
    """Synthetic learning curve: better with x[0] and with the epoch."""
    return 0.4 * x0 + 0.6 * (1.0 - torch.exp(-epoch / 3.0))


def make_rows(n_configs: int, seed: int, *, weights: bool = False) -> tuple[SurrogateRows, Tensor]:
    """One row per (configuration, epoch), with the curve before that epoch (DyHPO's training rows)."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(n_configs, X_DIM, generator=g)
    last = torch.randint(1, CAP + 1, (n_configs,), generator=g)
    rows_x, budget, curves, lengths, targets, windex = [], [], [], [], [], []
    for i in range(n_configs):
        epochs = torch.arange(1, int(last[i]) + 1, dtype=torch.float32)
        curve = score(xs[i, 0], epochs) + 0.005 * torch.randn(len(epochs), generator=g)
        for k in range(1, int(last[i]) + 1):
            rows_x.append(xs[i])
            budget.append(k / CAP)
            padded = torch.zeros(CAP)
            padded[: k - 1] = curve[: k - 1]
            curves.append(padded)
            lengths.append(k - 1)
            targets.append(curve[k - 1])
            windex.append(i)
    rows = SurrogateRows(
        x=torch.stack(rows_x),
        budget=torch.tensor(budget),
        curves=torch.stack(curves),
        curve_lengths=torch.tensor(lengths),
    )
    if weights:
        rows = attach_weights(rows, torch.tensor(windex), n_configs, seed)
    return rows, torch.stack(targets)


def attach_weights(rows: SurrogateRows, index: Tensor, n_modules: int, seed: int) -> SurrogateRows:
    g = torch.Generator().manual_seed(1000 + seed)
    modules = []
    for _ in range(n_modules):
        module = nn.Linear(4, 2)
        with torch.no_grad():
            module.weight.copy_(torch.randn(2, 4, generator=g) * float(torch.rand(1, generator=g) * 3))
            module.bias.copy_(torch.randn(2, generator=g))
        modules.append(module)
    return SurrogateRows(
        x=rows.x,
        budget=rows.budget,
        curves=rows.curves,
        curve_lengths=rows.curve_lengths,
        weight_index=index,
        weights=modules,
        weight_keys=[f"m{i}" for i in range(n_modules)],
    )


class StatsFeaturizer(nn.Module):
    """Tiny weights encoder: mean and std of each module's parameters -> Linear -> tanh."""

    embedding_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, self.embedding_dim)
        self.calls = 0

    def forward(self, modules, keys=None) -> Tensor:
        self.calls += 1
        stats = []
        for module in modules:
            flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
            stats.append(torch.stack([flat.mean(), flat.std()]))
        return torch.tanh(self.linear(torch.stack(stats)))


def subset(rows: SurrogateRows, index: Tensor) -> SurrogateRows:
    return SurrogateRows(
        x=rows.x[index],
        budget=rows.budget[index],
        curves=rows.curves[index],
        curve_lengths=rows.curve_lengths[index],
        weight_index=None if rows.weight_index is None else rows.weight_index[index],
        weights=rows.weights,
        weight_keys=rows.weight_keys,
    )


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.fixture(scope="module")
def data() -> tuple[SurrogateRows, Tensor, SurrogateRows, Tensor]:
    train, y = make_rows(10, seed=0)
    test, y_test = make_rows(12, seed=1)
    return train, y, test, y_test


def test_fit_posterior_shapes_and_tracking(data) -> None:
    train, y, test, y_test = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, **{**FAST, "full_fit_steps": 300})
    surrogate.fit(train, y, seed=0)
    mean, var = surrogate.posterior(test)
    assert mean.shape == var.shape == (len(test),)
    assert mean.device.type == var.device.type == "cpu"
    assert mean.dtype == torch.float64
    assert bool((var >= 1e-12).all()) and bool(torch.isfinite(mean).all())
    rmse = (mean - y_test).square().mean().sqrt()
    constant = (y.mean() - y_test).square().mean().sqrt()
    assert rmse < 0.5 * constant, (rmse, constant)
    assert not surrogate.answers_with_prior


def test_posterior_matches_gpytorch_prediction(data) -> None:
    train, y, test, _ = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, kernel="matern", **FAST)
    surrogate.fit(train, y, seed=3)
    mean, var = surrogate.posterior(test)
    model = surrogate._model
    model.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10_000):
        inputs = surrogate._inputs(test, surrogate._y_mean, surrogate._y_std)
        prediction = model(inputs)
    std = surrogate._y_std
    torch.testing.assert_close(mean, prediction.mean.double() * std + surrogate._y_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, prediction.variance.double().clamp_min(1e-12) * std**2, rtol=1e-5, atol=1e-6)


def test_determinism_and_caller_rng_untouched(data) -> None:
    train, y, test, _ = data
    answers = []
    for _ in range(2):
        surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, **FAST)
        before = torch.get_rng_state()
        surrogate.fit(train, y, seed=7)
        assert torch.equal(before, torch.get_rng_state())
        answers.append(surrogate.posterior(test))
    assert torch.equal(answers[0][0], answers[1][0]) and torch.equal(answers[0][1], answers[1][1])
    other = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, **FAST)
    other.fit(train, y, seed=8)
    assert not torch.equal(other.posterior(test)[0], answers[0][0])


def test_state_dict_roundtrip_is_exact(data) -> None:
    train, y, test, _ = data
    more, y_more = make_rows(12, seed=5)
    original = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, full_fits=1, **{**FAST, "learning_rate": 1e-3})
    original.fit(subset(train, torch.arange(20)), y[:20], seed=0)
    original.fit(train, y, seed=1)  # a refine fit
    original.posterior(more)  # an unrelated query first must not change later answers
    state = roundtrip(original.state_dict())
    restored = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, full_fits=1, **{**FAST, "learning_rate": 1e-3})
    restored.load_state_dict(state)
    for a, b in zip(original.posterior(test), restored.posterior(test)):
        assert torch.equal(a, b)
    original.fit(more, y_more, seed=2)
    restored.fit(more, y_more, seed=2)
    assert original.num_refine_fits == restored.num_refine_fits == 2
    for a, b in zip(original.posterior(test), restored.posterior(test)):
        assert torch.equal(a, b)


def test_load_rejects_other_config(data) -> None:
    train, y, _, _ = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, **FAST)
    surrogate.fit(train, y, seed=0)
    with pytest.raises(ValueError, match="config"):
        DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, hidden=8, **FAST).load_state_dict(surrogate.state_dict())


def test_full_fits_then_refine(monkeypatch, data) -> None:
    train, y, _, _ = data
    surrogate = DeepKernelSurrogate(
        x_dim=X_DIM, curve_length=CAP, full_fits=2, full_fit_steps=12, refine_steps=3, device="cpu"
    )
    calls = []
    original_loss = DeepKernelSurrogate._negative_mll

    def counting_loss(self, *args):
        calls[-1] += 1
        return original_loss(self, *args)

    monkeypatch.setattr(DeepKernelSurrogate, "_negative_mll", counting_loss)
    for fit in range(4):
        calls.append(0)
        surrogate.fit(train, y, seed=fit)
    assert calls == [12, 12, 3, 3]
    assert (surrogate.num_fits, surrogate.num_full_fits, surrogate.num_refine_fits) == (4, 2, 2)


def test_full_fit_restarts_from_scratch(data) -> None:
    train, y, test, _ = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, full_fits=5, **FAST)
    surrogate.fit(train, y, seed=4)
    first = surrogate.posterior(test)
    surrogate.fit(train, y, seed=4)  # full again: same seed and data -> same answer, not a continuation
    assert torch.equal(first[0], surrogate.posterior(test)[0])


def test_fewer_than_two_rows_give_the_prior(data) -> None:
    train, y, test, _ = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, **FAST)
    mean, var = surrogate.posterior(test)
    assert torch.equal(mean, torch.zeros(len(test), dtype=torch.float64)) and bool((var == 1).all())
    surrogate.fit(subset(train, torch.tensor([3])), y[3:4], seed=0)
    mean, var = surrogate.posterior(test)
    assert torch.allclose(mean, torch.full_like(mean, float(y[3]))) and bool((var == 1).all())
    assert surrogate.answers_with_prior and surrogate.num_fits == 0


def test_recovery_from_a_nan_step(monkeypatch, caplog, data) -> None:
    train, y, test, _ = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, full_fits=1, **FAST)
    surrogate.fit(train, y, seed=0)
    original_loss = DeepKernelSurrogate._negative_mll
    budget = {"nan": 1}

    def flaky_loss(self, *args):
        loss = original_loss(self, *args)
        if budget["nan"]:
            budget["nan"] -= 1
            return loss * float("nan")
        return loss

    monkeypatch.setattr(DeepKernelSurrogate, "_negative_mll", flaky_loss)
    with caplog.at_level(logging.WARNING, logger=exact_gp.__name__):
        surrogate.fit(train, y, seed=1)  # a refine fit that fails at once, then a full retry
    assert "numerical failure" in caplog.text
    assert surrogate.num_recoveries == 1 and surrogate.num_prior_fallbacks == 0
    assert (surrogate.num_full_fits, surrogate.num_refine_fits) == (2, 0)
    assert surrogate._jitter == exact_gp.RECOVERY_JITTER
    mean, var = surrogate.posterior(test)
    assert not surrogate.answers_with_prior and bool(torch.isfinite(mean).all())
    assert roundtrip(surrogate.state_dict())["counts"]["recoveries"] == 1


def test_recovery_from_a_cholesky_failure(monkeypatch, data) -> None:
    train, y, test, _ = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, **FAST)
    original = exact_gp.psd_safe_cholesky
    state = {"fail": 1}

    def failing_cholesky(matrix, *args, **kwargs):
        if state["fail"]:
            state["fail"] -= 1
            raise exact_gp.NotPSDError("injected: matrix not positive definite")
        return original(matrix, *args, **kwargs)

    monkeypatch.setattr(exact_gp, "psd_safe_cholesky", failing_cholesky)
    surrogate.fit(train, y, seed=0)
    assert surrogate.num_recoveries == 1 and not surrogate.answers_with_prior
    assert bool(torch.isfinite(surrogate.posterior(test)[0]).all())


def test_persistent_failure_falls_back_to_the_prior(monkeypatch, data) -> None:
    train, y, test, _ = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, full_fits=1, **FAST)
    surrogate.fit(train, y, seed=0)
    before = {k: v.clone() for k, v in surrogate._model.state_dict().items()}
    original_loss = DeepKernelSurrogate._negative_mll
    monkeypatch.setattr(DeepKernelSurrogate, "_negative_mll", lambda self, *a: original_loss(self, *a) * float("nan"))
    surrogate.fit(train, y, seed=1)
    assert surrogate.num_recoveries == 1 and surrogate.num_prior_fallbacks == 1 and surrogate.answers_with_prior
    for key, value in surrogate._model.state_dict().items():  # reverted to the parameters before the fit
        assert torch.equal(value, before[key])
    mean, var = surrogate.posterior(test)
    assert torch.allclose(mean, torch.full_like(mean, float(y.double().mean())))
    assert torch.allclose(var, torch.full_like(var, float(y.double().std()) ** 2))
    monkeypatch.setattr(DeepKernelSurrogate, "_negative_mll", original_loss)
    surrogate.fit(train, y, seed=2)  # after a failure the next fit is a full one, even past full_fits
    assert (surrogate.num_full_fits, surrogate.num_refine_fits) == (2, 0)
    assert not surrogate.answers_with_prior


def test_use_curve_false_ignores_curves(data) -> None:
    train, y, test, _ = data
    scrambled_train = SurrogateRows(train.x, train.budget, torch.rand_like(train.curves), train.curve_lengths)
    scrambled_test = SurrogateRows(test.x, test.budget, torch.rand_like(test.curves) * 5, test.curve_lengths)
    answers = []
    for rows in (train, scrambled_train):
        surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, use_curve=False, **FAST)
        surrogate.fit(rows, y, seed=0)
        answers.append(surrogate.posterior(test)[0])
        assert torch.equal(answers[-1], surrogate.posterior(scrambled_test)[0])
    assert torch.equal(answers[0], answers[1])
    with_curve = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, **FAST)
    with_curve.fit(train, y, seed=0)
    assert not torch.equal(with_curve.posterior(test)[0], with_curve.posterior(scrambled_test)[0])


def test_short_caps_pad_curves_to_the_kernel() -> None:
    rows = SurrogateRows(
        x=torch.rand(4, 2),
        budget=torch.tensor([0.5, 1.0, 0.5, 1.0]),
        curves=torch.tensor([[0.0], [0.3], [0.0], [0.5]]),
        curve_lengths=torch.tensor([0, 1, 0, 1]),
    )
    surrogate = DeepKernelSurrogate(x_dim=2, curve_length=1, cnn_kernel=3, **FAST)
    surrogate.fit(rows, torch.tensor([0.2, 0.3, 0.4, 0.5]), seed=0)
    mean, var = surrogate.posterior(rows)
    assert mean.shape == (4,) and bool(torch.isfinite(var).all())


def test_featurizer_changes_predictions_and_is_trained() -> None:
    train, y = make_rows(8, seed=2, weights=True)
    featurizer = StatsFeaturizer()
    init = featurizer.linear.weight.detach().clone()
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, featurizer=featurizer, **FAST)
    surrogate.fit(train, y, seed=0)
    assert featurizer.linear.weight.grad is not None and float(featurizer.linear.weight.grad.abs().sum()) > 0
    assert not torch.equal(featurizer.linear.weight.detach(), init)
    # two candidates that differ only in their weights get different predictions
    query = subset(train, torch.tensor([0, 0]))
    query = attach_weights(query, torch.tensor([0, 1]), 2, seed=9)
    mean, _ = surrogate.posterior(query)
    assert mean[0] != mean[1]
    with pytest.raises(ValueError, match="weights"):
        surrogate.posterior(make_rows(2, seed=3)[0])


def test_featurizer_state_roundtrip_answers_without_refit() -> None:
    train, y = make_rows(8, seed=2, weights=True)
    test, _ = make_rows(5, seed=4, weights=True)
    kwargs = {"x_dim": X_DIM, "curve_length": CAP, "full_fits": 1, **FAST}
    original = DeepKernelSurrogate(featurizer=StatsFeaturizer(), **kwargs)
    original.fit(train, y, seed=0)
    original.fit(train, y, seed=1)
    state = roundtrip(original.state_dict())
    restored = DeepKernelSurrogate(featurizer=StatsFeaturizer(), **kwargs)  # a differently initialised featurizer
    restored.load_state_dict(state)
    for a, b in zip(original.posterior(test), restored.posterior(test)):
        assert torch.equal(a, b)
    original.fit(test, torch.linspace(0.1, 0.9, len(test)), seed=2)
    restored.fit(test, torch.linspace(0.1, 0.9, len(test)), seed=2)
    for a, b in zip(original.posterior(train), restored.posterior(train)):
        assert torch.equal(a, b)


def test_rejects_bad_input(data) -> None:
    train, y, _, _ = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM + 1, curve_length=CAP, **FAST)
    with pytest.raises(ValueError, match="columns"):
        surrogate.fit(train, y, seed=0)
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, **FAST)
    with pytest.raises(ValueError, match="targets"):
        surrogate.fit(train, torch.full_like(y, math.nan), seed=0)
    with pytest.raises(ValueError, match="kernel"):
        DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, kernel="linear")


def test_initial_noise_option(data) -> None:
    train, y, _, _ = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, initial_noise=0.05, **{**FAST, "full_fit_steps": 0})
    surrogate.fit(train, y, seed=0)
    assert math.isclose(float(surrogate._model.likelihood.noise.detach()), 0.05, rel_tol=1e-5)
    default = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, **{**FAST, "full_fit_steps": 0})
    default.fit(train, y, seed=0)
    assert float(default._model.likelihood.noise.detach()) > 0.5


def test_a_bug_during_fit_restores_the_previous_state(monkeypatch, data) -> None:
    train, y, test, _ = data
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, full_fits=1, **FAST)
    surrogate.fit(train, y, seed=0)
    before = surrogate.posterior(test)

    def broken(self, *args):
        raise KeyError("bug")

    monkeypatch.setattr(DeepKernelSurrogate, "_negative_mll", broken)
    with pytest.raises(KeyError):
        surrogate.fit(train, y, seed=1)
    assert surrogate.num_fits == 1 and surrogate.num_recoveries == 0
    for a, b in zip(before, surrogate.posterior(test)):
        assert torch.equal(a, b)
