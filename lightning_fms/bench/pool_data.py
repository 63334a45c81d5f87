"""A benchmark pool's data: the tabulated curves, the stored weights, and how they are read back.

Methods are benchmarked on a pool as on a table: "training" epoch ``k`` of configuration ``i`` looks
up ``val[i, k-1]``, and a featurizer reads the weights the real training left after that epoch.
:mod:`lightning_fms.bench.pool_build` trains and writes pools; :mod:`lightning_fms.bench.pool` is the public face.

Storage (under ``{cache}/bench/pools/{task}-{fingerprint[:12]}/``)::

    task.json                 the task's settings and the N sampled configurations (informational)
    configs/0007.safetensors  weights after epochs 1..E of configuration 7, float16, keys "e01/<param>"
    configs/0007.json         its curves (val, test, seconds per epoch), written after the weights
    pool.json                 everything but the weights, once every configuration is done

Every file is written atomically (temporary file, then rename): a killed build leaves whole files
only, and the next build trains exactly the configurations whose two files are not both there.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import safe_open
from torch import nn

from lightning_fms.errors import CheckpointError, FMSError, one_line
from lightning_fms.hub import ModelHub
from lightning_fms.search.space import SearchSpace
from lightning_fms.search.trial import config_key
from lightning_fms.zoo.build import default_cache_dir

if TYPE_CHECKING:
    from lightning_fms.bench.task import BenchTask


@dataclass
class Pool:
    """A task's tabulated configurations.

    Attributes:
        name: Task name.
        space: The task's search space (every configuration fits it).
        configs: ``N`` configurations.
        val: ``[N, E]`` monitored validation value after epochs ``1..E``.
        test: ``[N, E]`` test value after epochs ``1..E``.
        train_seconds: ``[N, E]`` measured seconds of each training epoch (validation included).
        mode: ``"max"`` or ``"min"`` for ``val``/``test``.
        load_module: ``(index, epoch) -> module`` with the weights after ``epoch`` of configuration
            ``index`` (``epoch == 0``: the pretrained weights it starts from), on the CPU.
        load_hub_module: ``entry name -> module`` with that hub entry's pretrained weights.
        meta: Free-form facts about how the pool was built (seed, build seconds, ...).
    """

    name: str
    space: SearchSpace
    configs: list[dict[str, Any]]
    val: np.ndarray
    test: np.ndarray
    train_seconds: np.ndarray
    mode: str
    load_module: Callable[[int, int], nn.Module]
    load_hub_module: Callable[[str], nn.Module]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {config_key(c): i for i, c in enumerate(self.configs)}

    @property
    def size(self) -> int:
        """Number of configurations ``N``."""
        return len(self.configs)

    @property
    def epochs(self) -> int:
        """Epochs per curve ``E``."""
        return int(self.val.shape[1])

    def index_of(self, config: dict[str, Any]) -> int:
        """Position of ``config`` in :attr:`configs` (``KeyError`` if it is not in the pool)."""
        return self._index[config_key(config)]

    def module(self, index: int, epoch: int) -> nn.Module:
        """The module with the weights after ``epoch`` (0: pretrained) of configuration ``index``."""
        return self.load_module(index, epoch)


POOL_FILE = "pool.json"
TASK_FILE = "task.json"
CONFIG_DIR = "configs"


def pool_dir(task: BenchTask, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of a task's pool: ``{cache}/bench/pools/{name}-{fingerprint[:12]}``.

    Args:
        task: The task (its fingerprint loads, or builds, its hub).
        cache_dir: The cache root; default :func:`~lightning_fms.zoo.build.default_cache_dir`.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "bench" / "pools" / f"{task.name}-{task.fingerprint()[:12]}"


def config_files(folder: Path, index: int) -> tuple[Path, Path]:
    """The weights file and the record file of configuration ``index`` in a pool's folder."""
    stem = folder / CONFIG_DIR / f"{index:04d}"
    return stem.with_name(f"{stem.name}.safetensors"), stem.with_name(f"{stem.name}.json")


class PoolWeights:
    """Rebuilds a pool's networks: a hub entry's architecture with the weights stored after an epoch.

    The module returned is what the tuner's featurizers see (:class:`~lightning_fms.study.modules.StudyModules`):
    the hub entry's ``nn.Module`` (the ``weights_attribute`` submodule of the trained LightningModule, by default
    the hub network ``net``), in eval mode with gradients off, on the CPU. Each entry's pretrained module is
    built once and copied for every call.

    Args:
        folder: The pool's folder.
        hub: The task's hub.
        space: The task's space (names the hub choice).
        configs: The pool's configurations.
        epochs: ``E``.
        failed: Configuration index -> the epoch it failed at (it has weights only before it).
    """

    def __init__(
        self,
        folder: Path,
        hub: ModelHub,
        space: SearchSpace,
        configs: list[dict[str, Any]],
        epochs: int,
        failed: dict[int, int],
    ) -> None:
        self.folder = folder
        self.hub = hub
        self.space = space
        self.configs = configs
        self.epochs = epochs
        self.failed = failed
        self._pretrained: dict[str, nn.Module] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the cached modules (a pool sent to another process rebuilds them there)."""
        return {**self.__dict__, "_pretrained": {}}

    def hub_module(self, name: str) -> nn.Module:
        """A fresh copy of hub entry ``name`` with its pretrained weights.

        Raises:
            FMSError: unknown entry, or its weights file does not verify.
        """
        if name not in self._pretrained:
            module = self.hub.build(name)
            module.eval().requires_grad_(False)
            self._pretrained[name] = module
        return copy.deepcopy(self._pretrained[name])

    def module(self, index: int, epoch: int) -> nn.Module:
        """The network of configuration ``index`` after ``epoch`` (0: its hub entry's pretrained weights).

        Stored float16 weights are cast back to the architecture's dtypes (float32).

        Raises:
            FMSError: ``index``/``epoch`` out of range, or the configuration failed before ``epoch``.
            CheckpointError: the weights file is missing or does not fit the architecture.
        """
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.configs):
            raise FMSError(f"configuration index must be in [0, {len(self.configs)}), got {index!r}")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= self.epochs:
            raise FMSError(f"epoch must be in [0, {self.epochs}], got {epoch!r}")
        assert self.space.hub_key is not None
        module = self.hub_module(str(self.configs[index][self.space.hub_key]))
        if epoch == 0:
            return module
        failed = self.failed.get(index)
        if failed is not None and epoch >= failed:
            raise FMSError(f"configuration {index} failed at epoch {failed}: it has no weights after epoch {epoch}")
        path, _ = config_files(self.folder, index)
        prefix = f"e{epoch:02d}/"
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                state = {key[len(prefix) :]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}
        except Exception as error:  # safetensors raises several types for missing or corrupt files
            raise CheckpointError(f"pool weights {path} are unreadable: {one_line(error)}") from None
        reference = module.state_dict()
        state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise CheckpointError(
                f"pool weights {path} (epoch {epoch}) do not fit the hub entry: {one_line(error)}"
            ) from None
        return module


def read_pool_file(folder: Path, fingerprint: str) -> dict[str, Any] | None:
    """``pool.json`` when it is there, current, and every configuration's weights file exists."""
    path = folder / POOL_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("fingerprint") != fingerprint:
        return None
    if not all(config_files(folder, i)[0].is_file() for i in range(len(data.get("configs", [])))):
        return None
    return data


def _array(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[math.nan if v is None else v for v in row] for row in rows], dtype=np.float64)


def pool_from_data(task: BenchTask, folder: Path, data: dict[str, Any], hub: ModelHub | None = None) -> Pool:
    """The :class:`Pool` of a task from its ``pool.json`` data (``hub``: the task's hub, when loaded already)."""
    hub = hub if hub is not None else task.load_hub()
    space = task.build_space(hub)
    configs = [dict(c) for c in data["configs"]]
    meta = dict(data.get("meta", {}))
    failed = {int(i): int(f["epoch"]) for i, f in meta.get("failures", {}).items()}
    weights = PoolWeights(folder, hub, space, configs, int(data["epochs"]), failed)
    meta["folder"] = str(folder)
    return Pool(
        name=task.name,
        space=space,
        configs=configs,
        val=_array(data["val"]),
        test=_array(data["test"]),
        train_seconds=_array(data["train_seconds"]),
        mode=str(data["mode"]),
        load_module=weights.module,
        load_hub_module=weights.hub_module,
        meta=meta,
    )


def folder_bytes(folder: str | os.PathLike[str]) -> int:
    """Total size in bytes of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
