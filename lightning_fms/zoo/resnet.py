"""A tiny residual network: BasicBlocks with BatchNorm, one downsampling stage."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_fms.zoo._base import FeaturesHeadNet


class BasicBlock(nn.Module):
    """Two ``Conv3x3 -> BatchNorm`` layers with a residual addition.

    When the block changes resolution or width, the shortcut is a ``1x1`` convolution (with the
    block's stride) followed by BatchNorm; otherwise it is the identity.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution (2 to halve the resolution).

    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: Feature maps ``[B, C_in, H, W]``.

        Returns:
            Feature maps ``[B, C_out, H / stride, W / stride]``.

        """
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class TinyResNet(FeaturesHeadNet):
    """Stem, a full-resolution stage, and one downsampling stage, then global average pooling.

    ``features``: ``[B, C, H, W] -> [B, 2 * width]``; ``head``: ``[B, 2 * width] -> [B, num_classes]``.

    Args:
        image_size: Height and width ``H = W`` of the input images (kept for a uniform constructor;
            the network is fully convolutional).
        num_classes: Number of output logits.
        width: Channels of the stem and the first stage; the second stage has ``2 * width``.
        blocks_per_stage: BasicBlocks per stage (at least 1).
        in_channels: Number of input channels ``C``.

    """

    def __init__(
        self,
        image_size: int = 8,
        num_classes: int = 5,
        width: int = 8,
        blocks_per_stage: int = 1,
        in_channels: int = 1,
    ):
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        self.image_size = image_size
        stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stage1 = nn.Sequential(*[BasicBlock(width, width) for _ in range(blocks_per_stage)])
        stage2 = nn.Sequential(
            BasicBlock(width, 2 * width, stride=2),
            *[BasicBlock(2 * width, 2 * width) for _ in range(blocks_per_stage - 1)],
        )
        self.num_features = 2 * width
        self.features = nn.Sequential(stem, stage1, stage2, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(self.num_features, num_classes)
