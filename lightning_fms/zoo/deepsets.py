"""DeepSets over pixels: an image as the set of its (value, row, col) elements."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_fms.zoo._base import FeaturesHeadNet


def coordinate_grid(height: int, width: int) -> Tensor:
    """Return the (row, col) coordinates of an ``height x width`` image, row-major, each in ``[-1, 1]``.

    Returns:
        Coordinates ``[H * W, 2]`` (a side of length 1 sits at 0).

    """
    rows = torch.linspace(-1.0, 1.0, height) if height > 1 else torch.zeros(1)
    cols = torch.linspace(-1.0, 1.0, width) if width > 1 else torch.zeros(1)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(height * width, 2)


def pixels_as_set(x: Tensor, coords: Tensor | None = None) -> Tensor:
    """Turn images into sets of pixel elements.

    Args:
        x: Images ``[B, C, H, W]``.
        coords: Precomputed :func:`coordinate_grid` ``[H * W, 2]`` or ``[1, H * W, 2]``; computed from
            ``x``'s shape when ``None`` (eager mode only; pass it to keep the function traceable by ``torch.fx``).

    Returns:
        Elements ``[B, H * W, C + 2]``: the ``C`` channel values, then the row and column in ``[-1, 1]``.

    """
    if coords is None:
        coords = coordinate_grid(x.shape[-2], x.shape[-1]).to(device=x.device, dtype=x.dtype)
    values = x.flatten(2).transpose(1, 2)  # [B, HW, C]
    grid = coords.reshape(1, -1, 2).expand(x.shape[0], -1, -1)  # [B, HW, 2]
    return torch.cat([values, grid], dim=-1)


class SetFeatures(nn.Module):
    """``rho(norm(pool(phi(element))))`` over the pixel set of an image.

    The pixel coordinates are a non-persistent buffer (not part of the state dict), built for
    ``image_size x image_size`` inputs; the forward pass has no data-dependent control flow, so
    ``torch.fx`` can trace it.

    Args:
        image_size: Height and width ``H = W`` of the input images.
        in_channels: Number of input channels ``C`` (elements have ``C + 2`` numbers).
        hidden: Width of ``phi`` and ``rho`` (the feature size ``F``).
        phi_depth: Linear+ReLU layers of ``phi`` (at least 1).
        rho_depth: Linear+ReLU layers of ``rho`` (at least 1).
        pooling: ``"mean"`` or ``"sum"``.
        norm: BatchNorm the pooled embedding before ``rho``. Pooling averages out most of what tells
            images apart (every image has the same coordinates), and the normalisation restores the
            scale of the remaining differences; without it plain SGD barely trains.

    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        hidden: int,
        phi_depth: int,
        rho_depth: int,
        pooling: str,
        norm: bool = True,
    ):
        super().__init__()
        if pooling not in ("mean", "sum"):
            raise ValueError(f"pooling must be 'mean' or 'sum', got {pooling!r}")
        if phi_depth < 1 or rho_depth < 1:
            raise ValueError("phi_depth and rho_depth must be >= 1")
        self.pooling = pooling
        self.register_buffer("coords", coordinate_grid(image_size, image_size).unsqueeze(0), persistent=False)
        phi: list[nn.Module] = []
        width = in_channels + 2
        for _ in range(phi_depth):
            phi += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.phi = nn.Sequential(*phi)
        self.norm: nn.Module = nn.BatchNorm1d(hidden) if norm else nn.Identity()
        rho: list[nn.Module] = []
        for _ in range(rho_depth):
            rho += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.rho = nn.Sequential(*rho)

    def forward(self, x: Tensor) -> Tensor:
        """Embed images as pixel sets.

        Args:
            x: Images ``[B, C, H, W]``.

        Returns:
            Set embeddings ``[B, hidden]``.

        """
        elements = self.phi(pixels_as_set(x, self.coords))  # [B, HW, hidden]
        pooled = elements.mean(dim=1) if self.pooling == "mean" else elements.sum(dim=1)
        return self.rho(self.norm(pooled))


class DeepSets(FeaturesHeadNet):
    """A permutation-invariant classifier of the image's pixels as (value, row, col) elements.

    ``features``: ``[B, C, H, W] -> [B, hidden]``; ``head``: ``[B, hidden] -> [B, num_classes]``.

    Args:
        image_size: Height and width ``H = W`` of the input images.
        num_classes: Number of output logits.
        hidden: Width of ``phi`` and ``rho`` (the feature size).
        phi_depth: Linear+ReLU layers of the per-element network ``phi``.
        rho_depth: Linear+ReLU layers of the post-pooling network ``rho``.
        pooling: ``"mean"`` or ``"sum"``.
        norm: BatchNorm the pooled embedding before ``rho`` (see :class:`SetFeatures`).
        in_channels: Number of input channels ``C``.

    """

    def __init__(
        self,
        image_size: int = 8,
        num_classes: int = 5,
        hidden: int = 64,
        phi_depth: int = 2,
        rho_depth: int = 1,
        pooling: str = "mean",
        norm: bool = True,
        in_channels: int = 1,
    ):
        super().__init__()
        self.image_size = image_size
        self.num_features = hidden
        self.features = SetFeatures(image_size, in_channels, hidden, phi_depth, rho_depth, pooling, norm)
        self.head = nn.Linear(hidden, num_classes)
