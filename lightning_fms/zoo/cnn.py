"""A small plain convolutional network (no normalisation, no residuals)."""

from __future__ import annotations

from torch import nn

from lightning_fms.zoo._base import FeaturesHeadNet


class SmallCNN(FeaturesHeadNet):
    """Stacked ``Conv3x3 -> ReLU -> MaxPool2`` stages followed by a small average pool.

    Stage ``i`` has ``width * 2**i`` channels; spatial size halves after each stage while it is at
    least 2. ``features``: ``[B, C, H, W] -> [B, F]`` with ``F = width * 2**(depth-1) * pooled**2``;
    ``head``: ``[B, F] -> [B, num_classes]``.

    Args:
        image_size: Height and width ``H = W`` of the input images.
        num_classes: Number of output logits.
        width: Channels of the first stage.
        depth: Number of convolution stages (at least 1).
        pooled: Side of the adaptive average pool before flattening.
        in_channels: Number of input channels ``C``.

    """

    def __init__(
        self,
        image_size: int = 8,
        num_classes: int = 5,
        width: int = 16,
        depth: int = 2,
        pooled: int = 2,
        in_channels: int = 1,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for i in range(depth):
            out = width * 2**i
            layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.ReLU()]
            if size >= 2 * pooled:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = out
        layers += [nn.AdaptiveAvgPool2d(pooled), nn.Flatten()]
        self.num_features = channels * pooled * pooled
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(self.num_features, num_classes)
