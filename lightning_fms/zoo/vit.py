"""A tiny vision transformer: patch embedding, cls token, learnable positions, pre-norm encoder layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_fms.zoo._base import FeaturesHeadNet


class ViTFeatures(nn.Module):
    """The transformer trunk of :class:`TinyViT`: images to the final cls-token embedding.

    Args:
        image_size: Height and width ``H = W`` of the input images.
        patch_size: Side ``P`` of the square patches; must divide ``image_size``.
        dim: Embedding width ``D``.
        depth: Number of encoder layers.
        heads: Attention heads per layer (must divide ``dim``).
        mlp_ratio: Width of each layer's MLP as a multiple of ``dim``.
        in_channels: Number of input channels ``C``.

    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        in_channels: int = 1,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide image_size {image_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(
                    d_model=dim,
                    nhead=heads,
                    dim_feedforward=int(dim * mlp_ratio),
                    dropout=0.0,
                    activation="gelu",
                    batch_first=True,
                    norm_first=True,
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """Embed images.

        Args:
            x: Images ``[B, C, H, W]``.

        Returns:
            The normalised cls-token embeddings ``[B, D]``.

        """
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # [B, 1, D]
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed  # [B, N + 1, D]
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens[:, 0])


class TinyViT(FeaturesHeadNet):
    """A tiny vision transformer classifying the cls token.

    ``features``: ``[B, C, H, W] -> [B, dim]``; ``head``: ``[B, dim] -> [B, num_classes]``.

    Args:
        image_size: Height and width ``H = W`` of the input images.
        num_classes: Number of output logits.
        patch_size: Side of the square patches; must divide ``image_size``. On 8x8 digits, 4 (a 2x2 grid of
            tokens plus the cls token) trains reliably with plain SGD; 2 (16 tokens) needs a smaller learning rate.
        dim: Embedding width (the feature size).
        depth: Number of encoder layers.
        heads: Attention heads per layer (must divide ``dim``).
        mlp_ratio: Width of each layer's MLP as a multiple of ``dim``.
        in_channels: Number of input channels ``C``.

    """

    def __init__(
        self,
        image_size: int = 8,
        num_classes: int = 5,
        patch_size: int = 4,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        in_channels: int = 1,
    ):
        super().__init__()
        self.num_features = dim
        self.features = ViTFeatures(image_size, patch_size, dim, depth, heads, mlp_ratio, in_channels)
        self.head = nn.Linear(dim, num_classes)
