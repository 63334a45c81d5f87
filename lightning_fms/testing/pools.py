"""Tiny benchmark pools for tests: task files written from recipes and their pools built for real."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml


def build_tiny_pools(tasks: Mapping[str, Mapping[str, Any]], root: Path, cache: Path) -> dict[str, Path]:
    """Write each task (a recipe plus ``name`` and ``pool``) to ``root/<name>.yaml`` and build its pool in ``cache``.

    Pools are built with the project's own pool builder on one torch thread (a pool's values then do not depend on
    the machine's thread count).

    Args:
        tasks: Task name -> the task as a mapping (``name`` is set from the key).
        root: Where the task files go.
        cache: The cache root the pools are built in.

    Returns:
        Task name -> its task file.
    """
    from lightning_fms.bench.pool import build_pool
    from lightning_fms.bench.task import BenchTask

    paths: dict[str, Path] = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, data in tasks.items():
            paths[name] = Path(root) / f"{name}.yaml"
            paths[name].write_text(yaml.safe_dump({**data, "name": name}))
            build_pool(BenchTask.from_file(paths[name]), cache_dir=cache)
    finally:
        torch.set_num_threads(previous)
    return paths


__all__ = ["build_tiny_pools"]
