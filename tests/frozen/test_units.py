"""Layer units: unit lists and trainable parameters per k, users' modules, norm modes, optimizers skipping frozen parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fms.errors import FMSError
from lightning_fms.frozen.callback import FrozenUnits
from lightning_fms.frozen.units import (
    layer_units,
    set_trainable_units,
    trainable_fraction,
    trainable_fractions,
)
from lightning_fms.zoo import MLP, DeepSets, SmallCNN, TinyResNet, TinyViT

BLOCK1 = ["conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias"]
BLOCK2 = BLOCK1 + ["shortcut.0.weight", "shortcut.1.weight", "shortcut.1.bias"]
VIT_BLOCK = [
    "self_attn.in_proj_weight",
    "self_attn.in_proj_bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "linear1.weight",
    "linear1.bias",
    "linear2.weight",
    "linear2.bias",
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
]

# Hand-written: (unit name, parameter names) from the input side to the output side.
EXPECTED_UNITS = {
    "MLP": [
        ("features.1", ["features.1.weight", "features.1.bias"]),
        ("features.3", ["features.3.weight", "features.3.bias"]),
        ("head", ["head.weight", "head.bias"]),
    ],
    "SmallCNN": [
        ("features.0", ["features.0.weight", "features.0.bias"]),
        ("features.3", ["features.3.weight", "features.3.bias"]),
        ("head", ["head.weight", "head.bias"]),
    ],
    "TinyResNet": [
        ("features.0.0", ["features.0.0.weight"]),
        ("features.0.1", ["features.0.1.weight", "features.0.1.bias"]),
        ("features.1.0", [f"features.1.0.{n}" for n in BLOCK1]),
        ("features.2.0", [f"features.2.0.{n}" for n in BLOCK2]),
        ("head", ["head.weight", "head.bias"]),
    ],
    "TinyViT": [
        (
            "features.patch_embed",
            ["features.cls_token", "features.pos_embed", "features.patch_embed.weight", "features.patch_embed.bias"],
        ),
        ("features.blocks.0", [f"features.blocks.0.{n}" for n in VIT_BLOCK]),
        ("features.blocks.1", [f"features.blocks.1.{n}" for n in VIT_BLOCK]),
        ("features.norm", ["features.norm.weight", "features.norm.bias"]),
        ("head", ["head.weight", "head.bias"]),
    ],
    "DeepSets": [
        ("features.phi.0", ["features.phi.0.weight", "features.phi.0.bias"]),
        ("features.phi.2", ["features.phi.2.weight", "features.phi.2.bias"]),
        ("features.norm", ["features.norm.weight", "features.norm.bias"]),
        ("features.rho.0", ["features.rho.0.weight", "features.rho.0.bias"]),
        ("head", ["head.weight", "head.bias"]),
    ],
}
NETS = {"MLP": MLP, "SmallCNN": SmallCNN, "TinyResNet": TinyResNet, "TinyViT": TinyViT, "DeepSets": DeepSets}


def _trainable(net: nn.Module) -> list[str]:
    return [name for name, p in net.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("arch", list(EXPECTED_UNITS))
def test_unit_lists_and_trainable_parameters_for_every_k(arch) -> None:
    net = NETS[arch]()
    units = layer_units(net)
    assert [(u.name, list(u.parameter_names)) for u in units] == EXPECTED_UNITS[arch]
    assert sorted(n for u in units for n in u.parameter_names) == sorted(n for n, _ in net.named_parameters())
    assert [u.modules[0] for u in units] == [net.get_submodule(u.name) for u in units]
    total = sum(p.numel() for p in net.parameters())
    fractions = trainable_fractions(net)
    assert len(fractions) == len(units) and fractions == sorted(fractions) and fractions[-1] == 1.0
    for k in range(1, len(units) + 2):
        expected = [name for _, names in EXPECTED_UNITS[arch][-k:] for name in names]
        assert set_trainable_units(net, k) == expected
        assert _trainable(net) == [n for n, _ in net.named_parameters() if n in expected]
        fraction = sum(p.numel() for p in net.parameters() if p.requires_grad) / total
        assert trainable_fraction(net, k) == pytest.approx(fraction) == fractions[min(k, len(units)) - 1]


def test_hand_written_trainable_names_mlp_and_resnet() -> None:
    mlp = MLP()
    assert _trainable(mlp) == [n for n, _ in mlp.named_parameters()]
    set_trainable_units(mlp, 1)
    assert _trainable(mlp) == ["head.weight", "head.bias"]
    set_trainable_units(mlp, 2)
    assert _trainable(mlp) == ["features.3.weight", "features.3.bias", "head.weight", "head.bias"]
    resnet = TinyResNet(blocks_per_stage=2)
    assert [u.name for u in layer_units(resnet)] == [
        "features.0.0",
        "features.0.1",
        "features.1.0",
        "features.1.1",
        "features.2.0",
        "features.2.1",
        "head",
    ]
    set_trainable_units(resnet, 3)
    assert _trainable(resnet) == [f"features.2.0.{n}" for n in BLOCK2] + [f"features.2.1.{n}" for n in BLOCK1] + [
        "head.weight",
        "head.bias",
    ]
    set_trainable_units(resnet, 6)
    assert _trainable(resnet) == [n for n, _ in resnet.named_parameters() if n != "features.0.0.weight"]


@pytest.mark.parametrize("k", [0, -1, "a", 1.5, True, None])
def test_bad_k_is_a_one_line_error(k) -> None:
    net = MLP()
    for call in (lambda: set_trainable_units(net, k), lambda: trainable_fraction(net, k), lambda: FrozenUnits(k)):
        with pytest.raises(FMSError) as info:
            call()
        assert "\n" not in str(info.value)
    assert _trainable(net) == [n for n, _ in net.named_parameters()]
    with pytest.raises(FMSError, match="no parameters"):
        set_trainable_units(nn.Sequential(nn.ReLU()), 1)


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        out += x
        return out.relu()


class _Encoder(nn.Module):
    """A user-written transformer-ish trunk: bare positional embedding, a ModuleList of blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.pos = nn.Parameter(torch.zeros(1, 3, 8))
        self.blocks = nn.ModuleList([_PreNorm(8), _PreNorm(8)])
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.out(h.mean(1))


class _PreNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        return x + (q @ k.transpose(1, 2)).softmax(-1) @ v


def test_users_modules() -> None:
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), _Residual(4), nn.Flatten(), nn.LazyLinear(3))
    seq(torch.rand(2, 1, 6, 6))  # materialise the lazy layer
    assert [u.name for u in layer_units(seq)] == ["0", "1", "3", "5"]
    set_trainable_units(seq, 2)
    assert _trainable(seq) == ["3.conv.weight", "3.conv.bias", "3.bn.weight", "3.bn.bias", "5.weight", "5.bias"]
    assert not seq[1].training and seq[3].bn.training

    encoder = _Encoder()
    units = layer_units(encoder)
    assert [u.name for u in units] == ["embed", "blocks.0", "blocks.1", "out"]
    assert units[0].parameter_names == ("pos", "embed.weight", "embed.bias")
    set_trainable_units(encoder, 3)
    assert not encoder.pos.requires_grad and encoder.blocks[0].qkv.weight.requires_grad
    encoder(torch.rand(2, 3, 4)).sum().backward()
    assert encoder.pos.grad is None and encoder.embed.weight.grad is None and encoder.out.weight.grad is not None

    whole = nn.Linear(3, 3)
    assert [(u.name, u.parameter_names) for u in layer_units(whole)] == [("", ("weight", "bias"))]
    # A user-given block class stays one unit; a user-given container class is unwrapped.
    assert [u.name for u in layer_units(encoder, block_types=[_Encoder])] == [""]
    assert [u.name for u in layer_units(seq, container_types=[_Residual])] == ["0", "1", "3.conv", "3.bn", "5"]


def test_norm_modes_follow_freezing_and_thawing() -> None:
    net = TinyResNet()
    bns = {name: m for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    set_trainable_units(net, 2)
    assert {n for n, m in bns.items() if not m.training} == {"features.0.1", "features.1.0.bn1", "features.1.0.bn2"}
    set_trainable_units(net, 5)
    assert all(m.training for m in bns.values())
    net.eval()
    set_trainable_units(net, 1)
    set_trainable_units(net, 5)
    assert not any(m.training for m in bns.values())  # thawing follows the network's mode


def test_sgd_skips_parameters_without_grad_even_with_weight_decay_and_momentum() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    set_trainable_units(net, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    for _ in range(3):
        optimizer.zero_grad()
        net(torch.rand(4, 3)).sum().backward()
        optimizer.step()
    assert net[0].weight.grad is None
    assert torch.equal(net[0].weight, before[0]) and torch.equal(net[0].bias, before[1])
    assert not torch.equal(net[1].weight, before[2])
    assert set(optimizer.state) == {net[1].weight, net[1].bias}
    # Re-freezing a unit that has a gradient and momentum: its stale gradient is dropped, so it stays put.
    set_trainable_units(net, 2)
    optimizer.zero_grad(set_to_none=False)
    net(torch.rand(4, 3)).sum().backward()
    optimizer.step()
    set_trainable_units(net, 1)
    assert net[0].weight.grad is None
    frozen = net[0].weight.detach().clone()
    optimizer.step()
    assert torch.equal(net[0].weight, frozen)
