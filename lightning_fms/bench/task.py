"""Benchmark tasks: a tuning recipe (hub + target datamodule + search space) plus the settings of its pool.

A task file is a recipe (see :mod:`lightning_fms.recipe`) with two more top-level keys::

    name: hub-digits                 # optional; default: the file's stem
    pool:
      size: 256                      # configurations sampled from the space
      epochs: 20                     # epochs each is trained for (= the recipe's max_epochs_per_trial)
      seed: 0                        # seeds the sampling and every configuration's training
      test_metric: lightning_fms.bench.pool:accuracy   # module:function(module, dataloader) -> float

Everything else is read by the recipe loader, so a task's modules are built exactly as the tuner builds
them from the same file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn
from torch.utils.data import DataLoader

from lightning_fms.errors import FMSError, one_line
from lightning_fms.hub import ModelHub, sha256_file
from lightning_fms.recipe import Recipe
from lightning_fms.search.space import SearchSpace
from lightning_fms.training.in_process import InProcessExecutor

__all__ = ["DEFAULT_TEST_METRIC", "POOL_BUILDER_VERSION", "POOL_KEYS", "BenchTask", "resolve_test_metric"]

POOL_BUILDER_VERSION = 1
"""Version of what a pool records and how; part of every fingerprint (bump it to invalidate all pools)."""

DEFAULT_TEST_METRIC = "lightning_fms.bench.pool:accuracy"
"""The test metric of a task that names none: top-1 accuracy of the module's forward."""

POOL_KEYS = ("size", "epochs", "seed", "test_metric")
"""Keys of a task file's ``pool:`` section."""

DEFAULT_POOL_SIZE = 256

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_METRIC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

TestMetric = Callable[[nn.Module, DataLoader], float]
"""``(module, dataloader) -> float``: the test value of a module (in eval mode, under ``no_grad``)."""


def resolve_test_metric(path: str) -> TestMetric:
    """Import a test metric given as ``package.module:function``.

    Raises:
        FMSError: the path is malformed, does not import, or is not callable.
    """
    if not isinstance(path, str) or not _METRIC.match(path):
        raise FMSError(f"pool.test_metric must look like 'package.module:function', got {path!r}")
    module_name, _, attr = path.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise FMSError(f"pool.test_metric: cannot import {path!r} ({one_line(error)})") from None
    if not callable(function):
        raise FMSError(f"pool.test_metric: {path!r} is not callable")
    return function


@dataclass
class BenchTask:
    """A benchmark task: what to tune (a recipe) and how its pool is sampled and trained.

    Build it with :meth:`from_file` (or :meth:`from_dict`).

    Attributes:
        name: Task name (letters, digits, ``.``, ``_``, ``-``); names the pool's folder.
        recipe: The tuning recipe (hub, model, data, space, monitor, mode, trainer options).
        pool_size: Number of configurations ``N`` sampled from the space.
        epochs: Epochs ``E`` each configuration is trained for; equals ``recipe.max_epochs_per_trial``.
        pool_seed: Seeds the sampling of the configurations and the training of each one.
        test_metric: ``package.module:function`` computing the test value of a module on a dataloader.
        path: The task file (``None`` when built from a mapping).
    """

    name: str
    recipe: Recipe
    pool_size: int = DEFAULT_POOL_SIZE
    epochs: int = 20
    pool_seed: int = 0
    test_metric: str = DEFAULT_TEST_METRIC
    path: Path | None = None
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BenchTask:
        """Read and validate a task file (a recipe plus ``name`` and ``pool``).

        Raises:
            FMSError: the file is missing or not YAML, the ``pool`` section or ``name`` is invalid, or the
                rest is not a valid recipe.
        """
        path = Path(path)
        if not path.is_file():
            raise FMSError(f"task file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise FMSError(f"task file {path} is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
        if not isinstance(data, Mapping):
            raise FMSError(f"task file {path} must be a mapping of settings")
        try:
            return cls.from_dict(data, base_dir=path.parent, default_name=path.stem, path=path.resolve())
        except FMSError as error:
            raise FMSError(f"task file {path}: {error}") from None

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        base_dir: Path | None = None,
        default_name: str | None = None,
        path: Path | None = None,
    ) -> BenchTask:
        """Validate a task given as a mapping (relative paths are taken from ``base_dir``).

        Raises:
            FMSError: a bad ``name``/``pool`` value or an invalid recipe.
        """
        data = dict(data)
        name = data.pop("name", default_name)
        if not isinstance(name, str) or not _NAME.match(name):
            raise FMSError(f"name must be letters, digits, '.', '_' or '-' (a folder name), got {name!r}")
        pool = data.pop("pool", None)
        pool = {} if pool is None else pool
        if not isinstance(pool, Mapping):
            raise FMSError(f"'pool' must be a mapping with keys {', '.join(POOL_KEYS)}, got {pool!r}")
        unknown = sorted(str(k) for k in pool if k not in POOL_KEYS)
        if unknown:
            raise FMSError(f"unknown pool key(s) {unknown} (known: {', '.join(POOL_KEYS)})")
        size = _positive_int(pool.get("size", DEFAULT_POOL_SIZE), "pool.size", 1)
        seed = _positive_int(pool.get("seed", 0), "pool.seed", 0)
        cap = data.get("max_epochs_per_trial")
        cap_is_int = isinstance(cap, int) and not isinstance(cap, bool)
        epochs = _positive_int(pool.get("epochs", cap if cap_is_int else 20), "pool.epochs", 1)
        if cap is None:
            data["max_epochs_per_trial"] = epochs
        elif cap_is_int and cap != epochs:
            raise FMSError(
                f"pool.epochs ({epochs}) differs from max_epochs_per_trial ({cap}): the pool's curves are the "
                "tuner's curves only when they are equal"
            )
        test_metric = pool.get("test_metric", DEFAULT_TEST_METRIC)
        resolve_test_metric(test_metric)
        if data.get("hub") is None:
            raise FMSError("a benchmark task needs a 'hub' (its pool stores the weights of hub networks)")
        space = data.get("space")
        if isinstance(space, Mapping) and not any(
            isinstance(spec, Mapping) and spec.get("type") == "hub" for spec in space.values()
        ):
            raise FMSError("a benchmark task's space needs a hub choice ({type: hub})")
        recipe = Recipe.from_dict(data, base_dir=base_dir)
        return cls(
            name=name,
            recipe=recipe,
            pool_size=size,
            epochs=epochs,
            pool_seed=seed,
            test_metric=test_metric,
            path=path,
        )

    # ------------------------------------------------------------------ building
    def load_hub(self) -> ModelHub:
        """The task's model hub (built first by the recipe's ``hub_builder`` when its file is missing)."""
        hub = self.recipe.load_hub()
        assert hub is not None  # from_dict refuses tasks without a hub
        return hub

    def build_space(self, hub: ModelHub | None = None) -> SearchSpace:
        """The task's search space, checked against the hub."""
        return self.recipe.build_space(hub if hub is not None else self.load_hub())

    def test_metric_fn(self) -> TestMetric:
        """The imported :attr:`test_metric` function."""
        return resolve_test_metric(self.test_metric)

    def build_executor(self, hub: ModelHub | None = None) -> InProcessExecutor:
        """The executor the tuner would use for this recipe with ``max_epochs_per_trial = epochs``.

        Its :meth:`~lightning_fms.training.in_process.InProcessExecutor.build_trial` turns a configuration into the
        trial's module, datamodule and Trainer arguments, and
        :meth:`~lightning_fms.training.in_process.InProcessExecutor.run_epoch` trains one epoch of a trial, exactly as
        under :class:`~lightning_fms.tuner.FMSTuner`.

        Raises:
            FMSError: imports, the space's keys or the trainer options do not fit.
        """
        hub = hub if hub is not None else self.load_hub()
        return self.recipe.build_executor(hub, self.build_space(hub), self.epochs)

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """Hex SHA-256 of everything that shapes the pool.

        Covers the recipe parts that change training (model, data, space, monitor, mode, trainer options,
        hub/epochs arguments, weights attribute), the hub's content (its YAML, which pins each weights
        file's SHA-256; files without one are hashed), the pool settings and :data:`POOL_BUILDER_VERSION`.
        Not covered (they do not change a pool): the task's name and path, the recipe's ``budget``,
        ``seed`` and search settings, where the cache lives. Loads (or builds) the hub once.
        """
        if self._fingerprint is None:
            hub = self.load_hub()
            assert hub.path is not None
            hub_digest = hashlib.sha256(hub.path.read_bytes())
            for entry in hub:
                if entry.sha256 is None:
                    hub_digest.update(sha256_file(entry.weights).encode())
            recipe = self.recipe
            payload = {
                "version": POOL_BUILDER_VERSION,
                "model": asdict(recipe.model),
                "data": asdict(recipe.data),
                "space": recipe.space_spec,
                "monitor": recipe.monitor,
                "mode": recipe.mode,
                "trainer": recipe.trainer,
                "hub_argument": recipe.hub_argument,
                "epochs_argument": recipe.epochs_argument,
                "weights_attribute": recipe.tuner.get("weights_attribute"),
                "hub": hub_digest.hexdigest(),
                "pool": {
                    "size": self.pool_size,
                    "epochs": self.epochs,
                    "seed": self.pool_seed,
                    "test_metric": self.test_metric,
                },
            }
            text = json.dumps(payload, sort_keys=True, default=repr)
            self._fingerprint = hashlib.sha256(text.encode()).hexdigest()
        return self._fingerprint


def _positive_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FMSError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise FMSError(f"{name} must be >= {minimum}, got {value}")
    return value
