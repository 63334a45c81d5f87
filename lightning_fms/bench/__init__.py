"""Benchmarks: methods side by side on tabulated pools, normalised regret and Kendall tau of forecasts.

``lightning-fms bench`` (see :mod:`lightning_fms.cli`) runs :func:`run_bench` over task files; the Python API
runs on :class:`Pool` objects, built in memory or loaded with ``load_pool``::

    from lightning_fms.bench import run_method, run_bench

    run = run_method("fms-gmn", pool, budget=100, seed=0)           # one MethodRun
    result = run_bench([pool], ["dyhpo", "random"], seeds=3, budget=50, out_dir="bench-out")
"""

from typing import Any

from lightning_fms.bench.ledger import Ledger
from lightning_fms.bench.methods import METHODS, MethodRun, MethodSpec, RunOptions, check_methods, run_method
from lightning_fms.bench.metrics import RegretBounds, mean_ci, normalised_regret, rank_correlation
from lightning_fms.bench.pool_data import Pool
from lightning_fms.bench.report import ReportMeta, write_report
from lightning_fms.bench.runner import BenchResult, PoolSource, run_bench

__all__ = [
    "METHODS",
    "BenchResult",
    "BenchTask",
    "Ledger",
    "MethodRun",
    "MethodSpec",
    "Pool",
    "PoolSource",
    "RegretBounds",
    "ReportMeta",
    "RunOptions",
    "check_methods",
    "load_pool",
    "mean_ci",
    "normalised_regret",
    "rank_correlation",
    "run_bench",
    "run_method",
    "write_report",
]

_LAZY = {"BenchTask": "lightning_fms.bench.task", "load_pool": "lightning_fms.bench.pool"}


def __getattr__(name: str) -> Any:
    """``BenchTask`` and ``load_pool``, imported on first use (building pools needs Lightning and a hub)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
