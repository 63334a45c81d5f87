"""The deep kernel's input side: row packing, the curve CNN and the weights branch."""

from __future__ import annotations

import pytest
import torch

from lightning_fms.surrogate import DeepKernelSurrogate, SurrogateRows
from lightning_fms.surrogate.feature_extractor import FeatureExtractor, WeightsBranch, pack_rows
from lightning_fms.testing.surrogates import learning_curve_rows, random_linears, select_rows, with_modules
from lightning_fms.weights import build_featurizer

CAP = 8
X_DIM = 3
FAST = {"full_fit_steps": 80, "refine_steps": 8, "learning_rate": 1e-2, "device": "cpu"}


def test_pack_rows_standardises_real_curve_entries_and_pads() -> None:
    rows = SurrogateRows(
        x=torch.tensor([[0.1, 0.2], [0.3, 0.4]]),
        budget=torch.tensor([0.5, 1.0]),
        curves=torch.tensor([[3.0, 9.0], [5.0, 7.0]]),
        curve_lengths=torch.tensor([1, 2]),
    )
    packed = pack_rows(
        rows, use_curve=True, curve_width=3, mu=1.0, std=2.0, device=torch.device("cpu"), dtype=torch.float64
    )
    expected = torch.tensor([[0.1, 0.2, 0.5, 1.0, 0.0, 0.0], [0.3, 0.4, 1.0, 2.0, 3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(packed, expected)
    without = pack_rows(
        rows, use_curve=False, curve_width=3, mu=1.0, std=2.0, device=torch.device("cpu"), dtype=torch.float32
    )
    assert without.dtype == torch.float32 and without.shape == (2, 3)


def test_extractor_reads_each_part_of_the_packed_row() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        extractor = FeatureExtractor(
            x_dim=2,
            curve_width=4,
            use_curve=True,
            embedding_dim=3,
            hidden=8,
            output_dim=5,
            cnn_channels=2,
            cnn_kernel=3,
        ).eval()
    packed = torch.rand(6, 2 + 1 + 4 + 3, generator=torch.Generator().manual_seed(0))
    features = extractor(packed)
    assert features.shape == (6, 5)
    for part in (slice(0, 3), slice(3, 7), slice(7, 10)):  # [x, budget], curve, embedding
        changed = packed.clone()
        changed[:, part] += 1.0
        assert not torch.equal(extractor(changed), features)


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
    train, y = learning_curve_rows(8, seed=2, x_dim=X_DIM, curve_length=CAP, with_weights=True)
    featurizer = build_featurizer("stats", embedding_dim=3)
    init = featurizer.proj.weight.detach().clone()
    surrogate = DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, featurizer=featurizer, **FAST)
    surrogate.fit(train, y, seed=0)
    assert featurizer.proj.weight.grad is not None and float(featurizer.proj.weight.grad.abs().sum()) > 0
    assert not torch.equal(featurizer.proj.weight.detach(), init)
    # two candidates that differ only in their weights get different predictions
    query = with_modules(select_rows(train, torch.tensor([0, 0])), torch.tensor([0, 1]), random_linears(2, 9), "q")
    mean, _ = surrogate.posterior(query)
    assert mean[0] != mean[1]
    with pytest.raises(ValueError, match="weights"):
        surrogate.posterior(learning_curve_rows(2, seed=3, x_dim=X_DIM, curve_length=CAP)[0])


def test_weights_branch_restarts_from_its_initial_state() -> None:
    rows, _ = learning_curve_rows(3, seed=4, x_dim=X_DIM, curve_length=CAP, with_weights=True)
    branch = WeightsBranch(build_featurizer("stats", embedding_dim=3), torch.device("cpu"))
    first = branch.embed(rows, torch.device("cpu"), torch.float64).detach()
    assert first.shape == (len(rows), 3) and first.dtype == torch.float64
    with torch.no_grad():
        branch.featurizer.proj.weight.add_(1.0)
    assert not torch.equal(branch.embed(rows, torch.device("cpu"), torch.float64).detach(), first)
    branch.restart()
    assert not branch.featurizer.training
    torch.testing.assert_close(branch.embed(rows, torch.device("cpu"), torch.float64).detach(), first)


def test_a_featurizer_needs_an_embedding_dim() -> None:
    with pytest.raises(ValueError, match="embedding_dim"):
        DeepKernelSurrogate(x_dim=X_DIM, curve_length=CAP, featurizer=torch.nn.Linear(2, 2), device="cpu")
