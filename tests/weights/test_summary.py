"""The summary featurizer: fixed statistics of W_t and of W_t - W_0, for any architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_fms.errors import FMSError
from lightning_fms.surrogate import SurrogateRows
from lightning_fms.surrogate.feature_extractor import WeightsBranch
from lightning_fms.testing.networks import mixed_architectures, tiny_cnn, tiny_mlp
from lightning_fms.weights import SummaryFeaturizer, build_featurizer
from lightning_fms.weights.summary import CHANGE_START, FEATURE_NAMES


def trained(module: nn.Module, steps: int, seed: int = 0) -> nn.Module:
    """A copy of ``module`` after ``steps`` SGD steps on a fixed regression batch."""
    torch.manual_seed(seed)
    out = copy.deepcopy(module)
    x, y = torch.randn(32, 3), torch.randn(32, 2)
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(out(x), y).backward()
        opt.step()
    return out


def feature(row: torch.Tensor, name: str) -> float:
    return float(row[FEATURE_NAMES.index(name)])


def test_features_are_the_documented_statistics() -> None:
    torch.manual_seed(0)
    m = tiny_mlp((3, 6, 5, 2))
    f = SummaryFeaturizer()
    row = f([m])[0]
    assert f.dtype == torch.float64 and row.dtype == torch.float64 and row.shape == (20,)
    assert not list(f.parameters())
    tensors = [p.detach().double().flatten() for p in m.parameters()]
    means = torch.stack([t.mean() for t in tensors])
    max_abs = torch.stack([t.abs().max() for t in tensors])
    assert feature(row, "mean/mean") == pytest.approx(float(means.mean()))
    assert feature(row, "mean/std") == pytest.approx(float(means.std(unbiased=False)))
    assert feature(row, "max_abs/max") == pytest.approx(float(max_abs.max()))
    assert feature(row, "std/min") == pytest.approx(min(float(t.std(unbiased=False)) for t in tensors))
    assert row[CHANGE_START:].abs().sum() == 0  # no reference: no change


def test_change_features_are_zero_at_the_start_and_grow_with_training() -> None:
    torch.manual_seed(1)
    hub = tiny_mlp((3, 6, 5, 2))
    f = SummaryFeaturizer()
    start = f([hub], references=[hub])[0]
    assert start[CHANGE_START:].abs().max() == 0
    assert torch.equal(start[:CHANGE_START], f([hub])[0][:CHANGE_START])
    rows = f([trained(hub, 1), trained(hub, 20)], references=[hub, hub])
    for name in ("relative_change/mean", "relative_change/max", "mean_abs_change/mean"):
        assert 0 < feature(rows[0], name) < feature(rows[1], name), name
    w0, w1 = hub[0].weight.detach().double(), trained(hub, 20)[0].weight.detach().double()
    expected = float((w1 - w0).norm() / w0.norm())
    per_tensor_max = feature(rows[1], "relative_change/max")
    assert per_tensor_max >= expected - 1e-9  # the first layer is one of the tensors summarised


def test_mixed_architectures_in_one_batch_and_a_bias_that_starts_at_zero() -> None:
    torch.manual_seed(2)
    modules = [*mixed_architectures(), tiny_cnn()]
    out = SummaryFeaturizer()(modules, references=modules)
    assert out.shape == (len(modules), 20) and torch.isfinite(out).all()
    zero_bias = tiny_mlp((3, 4, 2))
    with torch.no_grad():
        for layer in (zero_bias[0], zero_bias[2]):
            layer.bias.zero_()
    moved = trained(zero_bias, 5)
    row = SummaryFeaturizer()([moved], references=[zero_bias])[0]
    assert torch.isfinite(row).all() and feature(row, "relative_change/max") > 0


def test_rows_are_cached_by_key_and_reference_presence() -> None:
    torch.manual_seed(3)
    hub = tiny_mlp()
    later = trained(hub, 5)
    f = SummaryFeaturizer()
    first = f([later], keys=["t1"], references=[hub])
    plain = f([later], keys=["t1"])
    assert plain[0, CHANGE_START:].abs().sum() == 0 and first[0, CHANGE_START:].abs().sum() > 0
    with torch.no_grad():
        next(later.parameters()).add_(1.0)
    assert torch.equal(f([later], keys=["t1"], references=[hub]), first)  # a key names one fixed set of weights
    f.clear_cache()
    assert not torch.equal(f([later], keys=["t1"], references=[hub]), first)


def test_bad_inputs_are_one_line_errors() -> None:
    f = build_featurizer("summary")
    with pytest.raises(FMSError, match="references for"):
        f([tiny_mlp(), tiny_mlp()], references=[tiny_mlp()])
    with pytest.raises(FMSError, match="its module's architecture") as err:
        f([tiny_mlp((3, 6, 2))], references=[tiny_mlp((3, 5, 2))])
    assert "\n" not in str(err.value)
    with pytest.raises(FMSError, match="no weights"):
        f([nn.ReLU()])
    with pytest.raises(FMSError, match="unknown option"):
        build_featurizer("summary", embedding_dim=8)


def test_the_deep_kernels_weights_branch_passes_the_rows_references() -> None:
    torch.manual_seed(4)
    hub = tiny_mlp()
    modules = [hub, trained(hub, 10)]
    fields = {
        "x": torch.rand(2, 1),
        "budget": torch.tensor([0.5, 1.0]),
        "curves": torch.zeros(2, 2),
        "curve_lengths": torch.tensor([0, 1]),
        "weight_index": torch.tensor([0, 1]),
        "weights": modules,
    }
    branch = WeightsBranch(SummaryFeaturizer(), torch.device("cpu"))
    without = branch.embed(SurrogateRows(**fields), torch.device("cpu"), torch.float64)
    with_refs = branch.embed(
        SurrogateRows(**fields, reference_index=torch.tensor([0, 0])), torch.device("cpu"), torch.float64
    )
    assert without[:, CHANGE_START:].abs().sum() == 0
    assert with_refs[0, CHANGE_START:].abs().sum() == 0 and with_refs[1, CHANGE_START:].abs().min() > 0
    assert torch.equal(with_refs[:, :CHANGE_START], without[:, :CHANGE_START])
