"""Helpers for tests of lightning_fms and of projects that use it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_fms.hub import ModelHub

__all__ = ["TINY_HUB_SPECS", "tiny_hub"]

TINY_HUB_SPECS: list[dict[str, Any]] = [
    {"name": "mlp-xs", "family": "mlp", "class_path": "lightning_fms.zoo.MLP", "init_args": {"hidden": 8}},
    {"name": "mlp-s", "family": "mlp", "class_path": "lightning_fms.zoo.MLP", "init_args": {"hidden": 16}},
    {"name": "cnn-xs", "family": "cnn", "class_path": "lightning_fms.zoo.SmallCNN", "init_args": {"width": 4}},
    {"name": "cnn-s", "family": "cnn", "class_path": "lightning_fms.zoo.SmallCNN", "init_args": {"width": 8}},
    {"name": "resnet-xs", "family": "resnet", "class_path": "lightning_fms.zoo.TinyResNet", "init_args": {"width": 4}},
    {"name": "resnet-s", "family": "resnet", "class_path": "lightning_fms.zoo.TinyResNet", "init_args": {"width": 6}},
]
"""Three families (mlp, cnn, resnet) with two widths each, as small as they come."""


def tiny_hub(directory: str | os.PathLike[str], epochs: int = 2, seed: int = 0) -> ModelHub:
    """Build (or reuse) a tiny hub of 3 families x 2 entries under ``directory``, pretrained on digits 0-4.

    Takes a few seconds on a laptop CPU; a valid hub already in ``directory`` (same specs, epochs and
    seed, files verified) is reused, so a session-scoped fixture can share one::

        @pytest.fixture(scope="session")
        def hub(tmp_path_factory):
            return tiny_hub(tmp_path_factory.mktemp("hub"))

    Args:
        directory: Folder for ``hub.yaml`` and the ``.safetensors`` weights.
        epochs: Pretraining epochs on the source task.
        seed: Base seed of the build.

    Returns:
        The hub, named ``"tiny"``, with entries ``mlp-xs, mlp-s, cnn-xs, cnn-s, resnet-xs, resnet-s``.

    """
    from lightning_fms.zoo.build import load_or_build_hub

    return load_or_build_hub(Path(directory), TINY_HUB_SPECS, source="source", epochs=epochs, seed=seed, name="tiny")
