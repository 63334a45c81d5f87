"""The summary weight features of every checkpoint an earlier task stored, computed once and cached.

What a study's :class:`~lightning_fms.weights.summary.SummaryFeaturizer` (default settings: parameters only)
computes for the module after epoch ``k`` against its run's ``W_0``, number for number, but from the stored
tensors directly: the featurizer's own per-tensor functions (:func:`~lightning_fms.weights.summary.tensor_features`,
:func:`~lightning_fms.weights.summary.summarise`) run over exactly the tensors it reads (the module's non-empty
parameters, in ``named_parameters`` order), each stored tensor first cast to its parameter's dtype as
``load_state_dict`` would. A pool's configuration file holds all its epochs, so it is opened once; no module is
rebuilt per checkpoint. Everything runs in float64 on one CPU thread.

The ``[N, E, 20]`` array of a source is cached in ``{cache}/transfer/features/{fingerprint}.safetensors``; a file
that does not read back as that array (corrupt, another shape, another version) is recomputed and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from lightning_fms.atomic import atomic_write_bytes
from lightning_fms.bench.pool_data import Pool, config_files
from lightning_fms.errors import CheckpointError, FMSError, one_line
from lightning_fms.search.space import SearchSpace
from lightning_fms.study.snapshots import WeightSnapshots
from lightning_fms.threads import torch_threads
from lightning_fms.weights.summary import FEATURE_NAMES, summarise, tensor_features
from lightning_fms.zoo.build import default_cache_dir

#: Features per checkpoint (:data:`~lightning_fms.weights.summary.FEATURE_NAMES`).
FEATURE_DIM = len(FEATURE_NAMES)
#: Version of what a cached feature file holds (bump it when the features change).
CACHE_VERSION = 1
_CACHE_TENSOR = "features"
_CACHE_META = "lightning_fms.transfer.features"


@dataclass
class FeatureCounts:
    """How often this process computed a source's weight features, and how often it read them from the cache."""

    computed: int = 0
    cached: int = 0


#: The process's counts (the cache's own record of whether it was used).
COUNTS = FeatureCounts()


class PretrainedTensors:
    """A hub entry's pretrained tensors (``W_0``) as the summary featurizer reads them.

    Args:
        names: Parameter names in ``named_parameters`` order; empty tensors are left out, as the featurizer does.
        reference: Name -> the pretrained tensor (at least the tensors in ``names``).
        where: Names the weights in messages.

    Raises:
        FMSError: a name has no tensor, or no tensor is left.
    """

    def __init__(self, names: Sequence[str], reference: Mapping[str, Tensor], where: str) -> None:
        missing = [name for name in names if name not in reference]
        if missing:
            raise CheckpointError(f"{where} has no tensor {missing[0]!r}")
        self.names = tuple(name for name in names if reference[name].numel() > 0)
        if not self.names:
            raise FMSError(f"the 'summary' features found no weights in {where}")
        self.reference = {name: reference[name].detach() for name in self.names}
        self.where = where
        self._pretrained: np.ndarray | None = None

    @classmethod
    def from_module(cls, module: nn.Module, where: str) -> PretrainedTensors:
        """The parameters of ``module`` (a hub entry's network with its pretrained weights)."""
        parameters = dict(module.named_parameters())
        return cls(list(parameters), parameters, where)

    def features(self, tensors: Mapping[str, Tensor], where: str) -> np.ndarray:
        """The 20 features of one checkpoint of this architecture against ``W_0``, shape ``[20]`` (float64).

        Args:
            tensors: Name -> stored tensor (a ``state_dict``; extra entries such as buffers are ignored).
            where: Names the checkpoint in messages.

        Raises:
            CheckpointError: a parameter is missing or has another shape.
        """
        rows = []
        for name in self.names:
            reference = self.reference[name]
            value = tensors.get(name)
            if value is None or value.shape != reference.shape:
                raise CheckpointError(
                    f"{where} has no tensor {name!r} of shape {tuple(reference.shape)}: it does not fit {self.where}"
                )
            rows.append(tensor_features(value.to(reference.dtype), reference))
        return summarise(torch.stack(rows)).numpy()

    @property
    def pretrained(self) -> np.ndarray:
        """The features of ``W_0`` itself (its change part is zero), shape ``[20]``."""
        if self._pretrained is None:
            self._pretrained = self.features(self.reference, self.where)
        return self._pretrained


def tensors_sha256(state: Mapping[str, Tensor]) -> str:
    """Hex SHA-256 of a flat dict of tensors: names, dtypes, shapes and bytes, by sorted name."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------ pools
def pool_features(pool: Pool) -> np.ndarray:
    """Features of every configuration of a pool after epochs ``0 .. E-1``.

    Args:
        pool: A pool read from its folder (``pool.meta["folder"]``: ``configs/NNNN.safetensors``, keys
            ``"eNN/<name>"``).

    Returns:
        ``[N, E, 20]`` float64; index ``[i, 0]`` is the hub entry's pretrained weights, ``NaN`` where a failed
        configuration has no checkpoint.

    Raises:
        CheckpointError: a configuration's weights file is unreadable or does not fit its hub entry.
    """
    folder = Path(pool.meta["folder"])
    hub_key = pool.space.hub_key
    assert hub_key is not None, "a pool's space has a hub choice"
    n, epochs = pool.size, pool.epochs
    out = np.full((n, epochs, FEATURE_DIM), np.nan)
    pretrained: dict[str, PretrainedTensors] = {}
    with torch_threads(1), torch.no_grad():
        for i, config in enumerate(pool.configs):
            entry = str(config[hub_key])
            if entry not in pretrained:
                pretrained[entry] = PretrainedTensors.from_module(pool.load_hub_module(entry), f"hub entry {entry!r}")
            reference = pretrained[entry]
            out[i, 0] = reference.pretrained
            path, _ = config_files(folder, i)
            for epoch, tensors in _pool_epochs(path, reference.names, epochs - 1).items():
                out[i, epoch] = reference.features(tensors, f"pool weights {path} (epoch {epoch})")
    return out


def _pool_epochs(path: Path, names: Sequence[str], last: int) -> dict[int, dict[str, Tensor]]:
    """The tensors named ``names`` of each epoch ``1 .. last`` stored in one configuration's weights file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = set(handle.keys())
            stored = sorted({int(key.split("/", 1)[0][1:]) for key in keys})
            out: dict[int, dict[str, Tensor]] = {}
            for epoch in (e for e in stored if 1 <= e <= last):
                prefix = f"e{epoch:02d}/"
                out[epoch] = {name: handle.get_tensor(prefix + name) for name in names if prefix + name in keys}
            return out
    except Exception as error:  # safetensors raises several types for missing or corrupt files
        raise CheckpointError(f"pool weights {path} are unreadable: {one_line(error)}") from None


# ------------------------------------------------------------------ studies
def study_features(
    snapshots: WeightSnapshots, space: SearchSpace, trials: Sequence[tuple[int, dict[str, Any]]], cap: int
) -> np.ndarray:
    """Features of every trial of a study after epochs ``0 .. cap-1``, from its weight snapshots.

    Args:
        snapshots: The study's snapshots: ``("hub", entry)`` with a module description (the tuner stores them),
            ``("trial", id, epoch)`` for each recorded epoch.
        space: The study's space (names the hub choice).
        trials: ``(id, configuration)`` of each trial, in row order.
        cap: The per-trial cap ``E``.

    Returns:
        ``[N, E, 20]`` float64, ``NaN`` where a snapshot does not exist.

    Raises:
        FMSError: a used hub entry has no described snapshot; a snapshot is unreadable or does not fit.
    """
    hub_key = space.hub_key
    assert hub_key is not None, "weights are recorded only on a hub"
    out = np.full((len(trials), cap, FEATURE_DIM), np.nan)
    pretrained: dict[str, PretrainedTensors] = {}
    with torch_threads(1), torch.no_grad():
        for i, (trial_id, config) in enumerate(trials):
            entry = str(config[hub_key])
            if entry not in pretrained:
                pretrained[entry] = pretrained_snapshot(snapshots, entry)
            reference = pretrained[entry]
            out[i, 0] = reference.pretrained
            for epoch in range(1, cap):
                key = ("trial", trial_id, epoch)
                if key in snapshots:
                    out[i, epoch] = reference.features(snapshots.get(key), f"weight snapshot {snapshots.path(key)}")
    return out


def pretrained_snapshot(snapshots: WeightSnapshots, entry: str) -> PretrainedTensors:
    """``W_0`` of hub entry ``entry`` from a study's snapshot ``("hub", entry)`` and its description.

    Raises:
        FMSError: there is no such snapshot or it has no description (a study of an older version).
    """
    key = ("hub", entry)
    where = f"weight snapshot {snapshots.path(key)}"
    description = snapshots.description(key) if key in snapshots else None
    names = description.get("parameters") if description is not None else None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise FMSError(
            f"{where} (the pretrained weights of hub entry {entry!r}) is missing or does not name its parameters "
            "(studies of older versions lack it: resume the study once with lightning-fms tune to add it)"
        )
    return PretrainedTensors(names, snapshots.get(key), where)


# ------------------------------------------------------------------ the cache
def features_cache_path(fingerprint: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where a source's features are cached: ``{cache}/transfer/features/{fingerprint}.safetensors``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "transfer" / "features" / f"{fingerprint}.safetensors"


def cached_features(
    fingerprint: str,
    shape: tuple[int, int],
    compute: Callable[[], np.ndarray],
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, float | None]:
    """A source's ``[N, E, 20]`` features from the cache, or computed (and cached) when the file does not fit.

    Args:
        fingerprint: The source's fingerprint (names the file).
        shape: ``(N, E)``.
        compute: Computes the features.
        cache_dir: The cache root (default :func:`~lightning_fms.zoo.build.default_cache_dir`).

    Returns:
        The features and the seconds spent computing them (``None``: read from the cache).
    """
    path = features_cache_path(fingerprint, cache_dir)
    expected = (*shape, FEATURE_DIM)
    features = _read_cache(path, fingerprint, expected)
    if features is not None:
        COUNTS.cached += 1
        return features, None
    start = time.perf_counter()
    features = np.ascontiguousarray(compute(), dtype=np.float64)
    assert features.shape == expected, f"features of shape {features.shape}, expected {expected}"
    COUNTS.computed += 1
    seconds = time.perf_counter() - start
    meta = json.dumps({"version": CACHE_VERSION, "fingerprint": fingerprint, "shape": list(expected)})
    atomic_write_bytes(path, save({_CACHE_TENSOR: torch.from_numpy(features)}, metadata={_CACHE_META: meta}))
    return features, seconds


def _read_cache(path: Path, fingerprint: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached array when the file is there and holds exactly it (else ``None``)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = json.loads((handle.metadata() or {}).get(_CACHE_META, "null"))
        tensor = load_file(str(path))[_CACHE_TENSOR]
    except Exception:  # a torn or foreign file is recomputed
        return None
    expected = {"version": CACHE_VERSION, "fingerprint": fingerprint, "shape": list(shape)}
    if meta != expected or tensor.dtype != torch.float64 or tuple(tensor.shape) != shape:
        return None
    return tensor.numpy()


__all__ = [
    "CACHE_VERSION",
    "COUNTS",
    "FEATURE_DIM",
    "FeatureCounts",
    "PretrainedTensors",
    "cached_features",
    "features_cache_path",
    "pool_features",
    "pretrained_snapshot",
    "study_features",
    "tensors_sha256",
]
