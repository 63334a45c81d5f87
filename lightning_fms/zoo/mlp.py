"""A multi-layer perceptron over flattened pixels."""

from __future__ import annotations

from torch import nn

from lightning_fms.zoo._base import FeaturesHeadNet


class MLP(FeaturesHeadNet):
    """Fully connected network on flattened images.

    ``features``: ``[B, C, H, W] -> [B, hidden]`` (flatten, then ``depth`` Linear+ReLU layers);
    ``head``: ``[B, hidden] -> [B, num_classes]``.

    Args:
        image_size: Height and width ``H = W`` of the input images.
        num_classes: Number of output logits.
        hidden: Width of every hidden layer (``F``, the feature size).
        depth: Number of hidden layers (at least 1).
        in_channels: Number of input channels ``C``.

    """

    def __init__(
        self, image_size: int = 8, num_classes: int = 5, hidden: int = 64, depth: int = 2, in_channels: int = 1
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.num_features = hidden
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, num_classes)
