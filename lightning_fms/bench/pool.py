"""Benchmark pools: a task's configurations with their full learning curves and per-epoch weights.

The public face of :mod:`~lightning_fms.bench.pool_data` (the :class:`Pool` and how it is stored and read back)
and :mod:`~lightning_fms.bench.pool_build` (training a pool), and the command line that builds pools::

    python -m lightning_fms.bench.pool TASK.yaml [TASK.yaml ...] [--jobs N] [--cache_dir DIR] [--quiet]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning_fms.bench.pool_build import accuracy, build_pool, build_pools, sample_configs
from lightning_fms.bench.pool_data import Pool, PoolWeights, folder_bytes, pool_dir, pool_from_data, read_pool_file
from lightning_fms.bench.task import BenchTask
from lightning_fms.errors import FMSError, error_line

__all__ = [
    "Pool",
    "PoolWeights",
    "accuracy",
    "build_pool",
    "build_pools",
    "folder_bytes",
    "load_pool",
    "main",
    "pool_dir",
    "sample_configs",
]


def load_pool(
    task: BenchTask,
    cache_dir: str | os.PathLike[str] | None = None,
    build: bool = True,
    jobs: int = 1,
) -> Pool:
    """The task's pool: read from the cache when complete, else built (only the missing configurations).

    Args:
        task: The task.
        cache_dir: The cache root (default :func:`~lightning_fms.zoo.build.default_cache_dir`).
        build: Build what is missing; ``False`` raises instead.
        jobs: Worker processes when building.

    Raises:
        FMSError: the pool is incomplete and ``build`` is ``False``, or building fails.
    """
    folder = pool_dir(task, cache_dir)
    data = read_pool_file(folder, task.fingerprint())
    if data is not None:
        return pool_from_data(task, folder, data)
    if not build:
        where = task.path if task.path is not None else "TASK.yaml"
        raise FMSError(
            f"the pool of task {task.name!r} is not built in {folder} (build it: python -m lightning_fms.bench.pool "
            f"{where})"
        )
    return build_pool(task, cache_dir=cache_dir, jobs=jobs)


class _DeprecatedSpelling(argparse.Action):
    """Stores the value of an old flag spelling and says which one to use instead."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        print(f"lightning-fms: warning: {option} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_fms.bench.pool TASK.yaml [...] [--jobs N] [--cache_dir DIR] [--quiet]``.

    ``--cache_dir`` is spelled as in ``lightning-fms bench``; the old ``--cache-dir`` still works, with a warning.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightning_fms.bench.pool",
        description="Build (or resume) the tabulated pools of benchmark task files.",
    )
    parser.add_argument("tasks", nargs="+", help="task files (recipes with a pool: section)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes per pool (default 1)")
    parser.add_argument("--cache_dir", default=None, help="cache root (default $LIGHTNING_FMS_CACHE or ~/.cache)")
    parser.add_argument(
        "--cache-dir", dest="cache_dir", action=_DeprecatedSpelling, new="--cache_dir", help=argparse.SUPPRESS
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = parser.parse_args(argv)
    try:
        build_pools(args.tasks, jobs=args.jobs, cache_dir=args.cache_dir, verbose=not args.quiet)
    except FMSError as error:
        print(error_line(error), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
