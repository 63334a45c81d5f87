"""The FLOP cost model of the frozen-layer levels: only the backward of trainable units is charged."""

import torch

from lightning_fms.frozen.costs import fraction_costs
from lightning_fms.frozen.units import layer_units
from lightning_fms.zoo import ImageClassifier, TinyResNet


def test_cost_model_counts_only_the_backward_of_trainable_units():
    torch.manual_seed(0)
    net = TinyResNet(width=8, num_classes=5)
    module = ImageClassifier(net, lr=0.1)
    batch = (torch.rand(16, 1, 8, 8), torch.randint(0, 5, (16,)))
    n, costs = fraction_costs(module, net, batch, (0.2, 0.6, 1.0))
    assert n == len(layer_units(net)) == 5
    assert costs[-1] == 1.0 and 0.0 < costs[0] < costs[1] < 1.0
    # The measurement leaves the network as it was: everything trainable, in train mode.
    assert all(p.requires_grad for p in net.parameters()) and module.training
