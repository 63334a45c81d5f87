"""The look-ahead weight trunk: it learns what checkpoints say about the future, and reads real modules frozen."""

from __future__ import annotations

import torch
from torch import nn

from lightning_fms.transfer.lookahead import PretrainedFeaturizer, WeightTrunk, lookahead_task, pretrain_trunk
from lightning_fms.weights.summary import SummaryFeaturizer


def _task(name: str, seed: int, informative: bool, n: int = 600):
    """Rows whose weight features encode the rest of the run (``informative``) or nothing."""
    g = torch.Generator().manual_seed(seed)
    final = torch.rand(n, generator=g, dtype=torch.float64)
    k = torch.randint(1, 6, (n,), generator=g)
    current = final * (k.double() / 6.0)
    curves = torch.zeros(n, 6, dtype=torch.float64)
    curves[torch.arange(n), (k - 2).clamp_min(0)] = current
    curves = curves * (k > 1).unsqueeze(-1)
    noise = torch.randn(n, 20, generator=g, dtype=torch.float64)
    features = noise.clone()
    if informative:
        features[:, 3] = 5.0 * (final - current) + 0.05 * noise[:, 3]
    return lookahead_task(name, features, k.double() / 6.0, curves, k - 1, final)


def test_the_trunk_beats_the_head_without_weights_when_the_weights_carry_the_future() -> None:
    tasks = [_task("a", 1, True), _task("b", 2, True)]
    result = pretrain_trunk(tasks, _task("c", 3, True), steps=300, batch_rows=256, eval_every=50)
    assert result.best_validation_mse < 0.5 * result.validation_mse_without_weights
    assert not any(p.requires_grad for p in result.trunk.parameters())


def test_without_information_in_the_weights_the_trunk_gains_little() -> None:
    tasks = [_task("a", 1, False), _task("b", 2, False)]
    result = pretrain_trunk(tasks, _task("c", 3, False), steps=200, batch_rows=256, eval_every=50)
    assert result.best_validation_mse > 0.8 * result.validation_mse_without_weights


def test_lookahead_targets_are_standardised_final_minus_current() -> None:
    final = torch.tensor([1.0, 3.0], dtype=torch.float64)
    curves = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    task = lookahead_task("t", torch.zeros(2, 20), torch.tensor([0.5, 0.25]), curves, torch.tensor([1, 0]), final)
    std = float(final.std())
    # row 0 has a current value (2.0); row 1 has none, so it starts from the task's mean (2.0) too
    assert torch.allclose(task.target, torch.tensor([-1.0 / std, 1.0 / std], dtype=torch.float64))
    assert task.context[:, 2].tolist() == [1.0, 0.0]


def test_pretrained_featurizer_reads_real_modules_through_the_frozen_trunk() -> None:
    torch.manual_seed(0)
    modules = [nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)) for _ in range(3)]
    reference = modules[0]
    trunk = WeightTrunk(20, embedding_dim=5)
    featurizer = PretrainedFeaturizer(SummaryFeaturizer(), trunk)
    out = featurizer(modules, keys=["a", "b", "c"], references=[reference] * 3)
    assert out.shape == (3, 5) and featurizer.embedding_dim == 5
    base = SummaryFeaturizer()(modules, references=[reference] * 3)
    assert torch.allclose(out, trunk(base))
    assert not out.requires_grad
