"""Tiny networks of the architectures a featurizer must handle, for tests (milliseconds to build and embed).

Each one exercises a different part of the parameter graph: plain ``Linear`` chains, convolutions with a flattened
head, a residual stream through BatchNorm, multi-head attention with embeddings, and Python control flow on a
tensor value (untraceable: the statistics fallback).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DataDependentNet",
    "TinyResidualNet",
    "TinyTransformer",
    "mixed_architectures",
    "randomize_batchnorm",
    "tiny_cnn",
    "tiny_mlp",
]


def tiny_mlp(sizes: tuple[int, ...] = (3, 6, 5, 2), bias: bool = True) -> nn.Sequential:
    """A ``Linear``/``ReLU`` chain.

    Args:
        sizes: Input size, hidden sizes and output size.
        bias: Whether the layers have biases.

    Returns:
        ``nn.Sequential(Linear, ReLU, ..., Linear)``, reading ``[B, sizes[0]]``.
    """
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def tiny_cnn(c1: int = 4, c2: int = 5) -> nn.Sequential:
    """Two 3x3 convolutions, global average pooling and a linear head with 2 outputs.

    Args:
        c1: Channels of the first convolution.
        c2: Channels of the second convolution.

    Returns:
        The network, reading ``[B, 1, H, W]`` with ``H, W >= 5``.
    """
    return nn.Sequential(
        nn.Conv2d(1, c1, 3), nn.ReLU(), nn.Conv2d(c1, c2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, 2)
    )


class TinyResidualNet(nn.Module):
    """Stem convolution + BatchNorm, one basic block with an identity skip, global pooling, linear head.

    Reads ``[B, 3, H, W]``.

    Args:
        c: Channels of the residual stream.
        hidden: Channels inside the block.
        classes: Outputs of the head.
    """

    def __init__(self, c: int = 4, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, hidden, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify images ``[B, 3, H, W]`` into ``[B, classes]`` logits."""
        x = F.relu(self.bn(self.stem(x)))
        out = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(out)) + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyTransformer(nn.Module):
    """Token + positional embeddings, one pre-LN block (multi-head attention + MLP), mean-pooled linear head.

    Reads token ids ``[B, L]`` with ``L <= length``.

    Args:
        d: Model width.
        heads: Attention heads.
        ff: Hidden width of the MLP.
        vocab: Vocabulary size.
        length: Longest sequence (positional embeddings).
    """

    def __init__(self, d: int = 8, heads: int = 2, ff: int = 12, vocab: int = 11, length: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(1, length, d))
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)
        self.head = nn.Linear(d, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Classify sequences ``[B, L]`` of token ids into ``[B, 2]`` logits."""
        x = self.emb(ids) + self.pos[:, : ids.shape[1]]
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        x = x + a
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(dim=1))


class DataDependentNet(nn.Module):
    """Python control flow on a tensor value: cannot be traced symbolically (reads ``[B, 4]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``b(a(x))`` if the inputs sum to a positive number, else ``b(x)``."""
        if x.sum() > 0:
            x = self.a(x)
        return self.b(x)


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm of ``module`` non-trivial affine parameters and running statistics, in place.

    Args:
        module: Any module.
        seed: Seed of the values.

    Returns:
        ``module``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g))
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return module


def mixed_architectures() -> list[nn.Module]:
    """One network of each traceable architecture, weights from the global random generator.

    Returns:
        ``[tiny_mlp(), tiny_cnn(), TinyResidualNet (BatchNorm randomised, evaluation mode), TinyTransformer()]``.
    """
    return [tiny_mlp((3, 6, 5, 2)), tiny_cnn(4, 5), randomize_batchnorm(TinyResidualNet()).eval(), TinyTransformer()]
