"""The memory estimate of an epoch: its parts against the tensors a real training step leaves, frozen vs full."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fms.errors import FMSError
from lightning_fms.frozen.memory import (
    DEFAULT_OPTIMIZER_SLOTS,
    batch_bytes,
    epoch_memory,
    module_optimizer_slots,
    optimizer_slots,
    resize_batch,
)
from lightning_fms.frozen.units import layer_units, set_trainable_units
from lightning_fms.search.space import SearchSpace
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.zoo import DigitsDataModule, ImageClassifier, SmallCNN


class ThreeLayers(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear with a cross-entropy training step (three layer units)."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)


def _batch(rows: int = 16):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, 64, generator=generator), torch.randint(0, 10, (rows,), generator=generator)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_parts_are_the_tensors_a_real_training_step_leaves(k):
    torch.manual_seed(0)
    module = ImageClassifier(SmallCNN(width=4), lr=0.05, momentum=0.9, num_classes=5)
    x = torch.randn(32, 1, 8, 8)
    batch = (x, torch.randint(0, 5, (32,)))
    n_units = len(layer_units(module.net))
    (estimate,) = epoch_memory(module, module.net, batch, [k / n_units])
    assert all(p.requires_grad for p in module.parameters())  # left as it was
    optimizer = module.configure_optimizers()["optimizer"]
    set_trainable_units(module.net, k)
    module.training_step(batch, 0).backward()
    optimizer.step()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert estimate.gradients == _nbytes(grads) > 0
    assert estimate.optimizer_state == _nbytes(state)  # SGD with momentum: one buffer per trainable parameter
    assert estimate.parameters == _nbytes([*module.parameters(), *module.buffers()])
    assert estimate.inputs == batch_bytes(batch) == _nbytes(batch)
    parts = (estimate.parameters, estimate.gradients, estimate.optimizer_state, estimate.inputs)
    assert estimate.total == sum(parts) + estimate.activations + estimate.workspace


def test_a_frozen_prefix_keeps_no_activations_for_backward():
    module = ThreeLayers(hidden=32)
    rows = 16
    one, two, three = epoch_memory(module, module.net, _batch(rows), [1 / 3, 2 / 3, 1.0], slots=1)
    hidden = rows * 32 * 4  # one float32 hidden activation
    # the last layer keeps the tensor entering it; two layers keep one more (the first layer's input is the batch)
    assert two.activations - one.activations == hidden and three.activations == two.activations
    assert one.gradients < two.gradients < three.gradients and one.total < two.total < three.total
    assert one.parameters == two.parameters == three.parameters  # frozen weights still sit on the device
    assert [e.fraction for e in (one, two, three)] == [1 / 3, 2 / 3, 1.0]
    # the largest module call: the first layer, the batch in and a hidden activation out (frozen or not)
    assert one.workspace == two.workspace == three.workspace == rows * 64 * 4 + hidden


def test_optimizer_slots():
    params = [nn.Parameter(torch.zeros(2))]
    assert optimizer_slots(torch.optim.SGD(params, lr=0.1)) == 0
    assert optimizer_slots(torch.optim.SGD(params, lr=0.1, momentum=0.9)) == 1
    assert optimizer_slots(torch.optim.Adam(params)) == 2
    assert optimizer_slots(torch.optim.AdamW(params, amsgrad=True)) == 3
    assert optimizer_slots(torch.optim.RMSprop(params, momentum=0.5, centered=True)) == 3
    assert module_optimizer_slots(ImageClassifier(SmallCNN(width=4), momentum=0.0, num_classes=5)) == 0
    assert module_optimizer_slots(ThreeLayers()) == DEFAULT_OPTIMIZER_SLOTS  # no configure_optimizers


def test_resize_batch_cuts_or_repeats_rows():
    x, y = _batch(4)
    bigger = resize_batch((x, y), 10)
    assert bigger[0].shape == (10, 64) and torch.equal(bigger[0][4:8], x) and bigger[1].shape == (10,)
    smaller = resize_batch({"x": x, "y": [y]}, 3)
    assert torch.equal(smaller["x"], x[:3]) and torch.equal(smaller["y"][0], y[:3])
    with pytest.raises(FMSError, match="positive integer"):
        resize_batch(x, 0)


def test_the_executor_estimates_each_configuration_at_its_batch_size(hub):
    space = SearchSpace.from_dict(
        {"hub": {"type": "hub"}, "data.batch_size": {"type": "categorical", "choices": [16, 64]}},
        hub_entries=hub.names,
    )
    executor = InProcessExecutor.from_factories(
        ImageClassifier, DigitsDataModule, space, hub, datamodule_options={"task": "target"}
    )
    small, large = executor.memory_estimates(
        [{"hub": "cnn-xs", "data.batch_size": 16}, {"hub": "cnn-xs", "data.batch_size": 64}], (0.25, 1.0)
    )
    assert large[0].inputs == 4 * small[0].inputs  # the batch cut or repeated to each configuration's size
    assert large[1].activations == pytest.approx(4 * small[1].activations, rel=1e-3)  # less a few scalars
    assert small[0].parameters == large[1].parameters
    assert small[0].total < small[1].total  # frozen layers need less
