"""The quality hub: one architecture pretrained well, barely, on corrupted labels or into divergence."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_fms.hub import ModelHub
from lightning_fms.zoo.build import DEFAULT_DEMO_EPOCHS, default_cache_dir, load_or_build_hub

__all__ = ["QUALITY_HUB_PRETRAINING", "QUALITY_HUB_SPECS", "QUALITY_HUB_WIDTHS", "build_quality_hub"]

QUALITY_HUB_WIDTHS = (8, 16)
"""Widths (first-stage channels) of the quality hub's :class:`~lightning_fms.zoo.SmallCNN` entries."""

QUALITY_HUB_PRETRAINING: dict[str, dict[str, Any]] = {
    "good-a": {"epochs": 15},
    "good-b": {"epochs": 15},
    "barely": {"epochs": 1, "lr": 0.002},
    "noisy": {"epochs": 15, "label_noise": 0.8},
    "random": {"epochs": 30, "label_noise": 1.0},
    "diverged": {"epochs": 3, "lr": 0.6},
}
"""Pretraining per quality, as :func:`~lightning_fms.zoo.build_hub` spec overrides (lr default 0.05).

``good``: 15 clean epochs (two seeds). ``barely``: one epoch at a learning rate 25 times lower, so the
weights are nearly their initialisation. ``noisy``: 80 % of the source labels redrawn at random.
``random``: every label redrawn (the network fits noise for 30 epochs). ``diverged``: a learning rate
of 0.6, at which pretraining blows up into dead ReLUs; fine-tuning cannot revive them.
"""

QUALITY_HUB_SPECS: list[dict[str, Any]] = [
    {
        "name": f"cnn{width:02d}-{quality}",
        "family": "cnn",
        "class_path": "lightning_fms.zoo.SmallCNN",
        "init_args": {"width": width},
        **overrides,
    }
    for width in QUALITY_HUB_WIDTHS
    for quality, overrides in QUALITY_HUB_PRETRAINING.items()
]
"""Specs of the quality hub: SmallCNN widths 8 and 16 x the six pretrainings of :data:`QUALITY_HUB_PRETRAINING`.

Two architectures, six pretraining qualities: the hub choice is mostly about how (and how well) an
entry was pretrained, which spreads the fine-tuned results far wider than the CNN hub's 2/5/15 epochs.
"""


def build_quality_hub(
    out_dir: str | os.PathLike[str] | None = None,
    epochs: int = DEFAULT_DEMO_EPOCHS,
    force: bool = False,
    seed: int = 0,
    verbose: bool = False,
) -> ModelHub:
    """Return the quality hub (:data:`QUALITY_HUB_SPECS` pretrained on digits 0-4), building it unless cached.

    Args:
        out_dir: The hub folder; defaults to ``default_cache_dir() / "hubs" / "quality"``.
        epochs: Pretraining epochs of specs without their own ``epochs`` (every shipped spec has one).
        force: Rebuild even when a valid cached hub exists.
        seed: Base seed.
        verbose: Print progress while building.

    Returns:
        The quality hub.

    """
    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "hubs" / "quality"
    return load_or_build_hub(
        out, QUALITY_HUB_SPECS, source="source", epochs=epochs, seed=seed, force=force, name="quality", verbose=verbose
    )
