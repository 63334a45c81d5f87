"""The shape every zoo network shares: a feature extractor and a linear head."""

from __future__ import annotations

from torch import Tensor, nn


class FeaturesHeadNet(nn.Module):
    """A classifier split as ``head(features(x))``.

    Subclasses set ``features`` (``[B, C, H, W] -> [B, F]``), ``head`` (``nn.Linear`` ``[B, F] -> [B, K]``)
    and ``num_features`` (``F``). :class:`~lightning_fms.zoo.ImageClassifier` puts dropout between the
    two and can re-initialise the head for a new task.
    """

    features: nn.Module
    head: nn.Linear
    num_features: int

    def forward(self, x: Tensor) -> Tensor:
        """Classify images.

        Args:
            x: Images ``[B, C, H, W]``.

        Returns:
            Logits ``[B, num_classes]``.
        """
        return self.head(self.features(x))
