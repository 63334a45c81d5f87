"""The prior file: what ``lightning-fms pretrain`` learned, as one safetensors file with JSON metadata.

A prior is a flat mapping of tensor names (``"surrogate/covar/.../raw_lengthscale"``, ``"trunk/0.weight"``) to
tensors, plus JSON metadata under the safetensors header key ``"lightning_fms"``: what the prior is for (searcher,
featurizer, curve input, frozen-layer fidelity, the non-hub search space), what it was learned from (the
sources' fingerprints) and how. It is read with safetensors only, never unpickled, and every check refuses in one
line (:class:`PriorError`):

* :func:`load_prior` refuses a file that is missing, not safetensors (truncated, random bytes, a pickle), without
  metadata, of another format version, or modified after it was written (its tensors or its metadata no longer
  match the checksums :func:`save_prior` stored);
* :func:`check_prior_fits` refuses a prior learned for another searcher, featurizer, curve setting, frozen-layer
  setting or non-hub search space.

Metadata keys (all required): ``format`` (:data:`PRIOR_FORMAT`), ``searcher`` (``"fms"`` or ``"dyhpo"``),
``weights`` (a featurizer name or ``"none"``, never ``"auto"``), ``curve``, ``frozen_layers`` (bool), ``space``
(the recipe form, :meth:`~lightning_fms.search.space.SearchSpace.to_dict`, of the non-hub parameters), ``hub_key``
(str or ``None``), ``columns`` (encoded column names of the sources' spaces,
:func:`~lightning_fms.transfer.columns.encoded_column_names`), ``sources`` (``{name, origin, fingerprint, rows}``
each), ``training`` (a mapping). :func:`save_prior` adds ``tensors_sha256`` (over the tensors) and
``metadata_sha256`` (over the other keys).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_fms.atomic import atomic_write_bytes
from lightning_fms.errors import FMSError, one_line
from lightning_fms.search.searcher import CURVE_ENCODERS, PRIOR_SEARCHERS
from lightning_fms.search.space import HubChoice, SearchSpace, parameter_from_dict
from lightning_fms.weights.registry import FEATURIZERS

__all__ = [
    "METADATA_KEY",
    "PRIOR_FORMAT",
    "Prior",
    "PriorError",
    "check_prior_fits",
    "load_prior",
    "save_prior",
]

#: The ``format`` of the prior files this version writes and reads.
PRIOR_FORMAT = "lightning_fms.prior/1"
#: The safetensors header metadata key that holds the prior's JSON metadata.
METADATA_KEY = "lightning_fms"
#: The checksums :func:`save_prior` computes; they are not part of :attr:`Prior.fingerprint`.
_CHECKSUM_KEYS = ("tensors_sha256", "metadata_sha256")
_REQUIRED_KEYS = (
    "format",
    "searcher",
    "weights",
    "curve",
    "frozen_layers",
    "space",
    "hub_key",
    "columns",
    "sources",
    "training",
)
_SOURCE_KEYS = ("name", "origin", "fingerprint", "rows")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class PriorError(FMSError):
    """A prior file that cannot be read, was modified, or does not fit the study (one line)."""


@dataclasses.dataclass
class Prior:
    """A learned starting point for a study's surrogate fits.

    Attributes:
        tensors: Flat tensor names (``"surrogate/covar/.../raw_lengthscale"``, ``"trunk/0.weight"``) -> tensors.
        metadata: JSON-serialisable metadata (the keys are listed in :mod:`lightning_fms.transfer.prior`).
        path: The file it was read from or written to (``None``: built in memory).
    """

    tensors: dict[str, Tensor]
    metadata: dict[str, Any]
    path: Path | None = None

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 over the tensors (sorted names, dtype, shape, bytes) and the canonical JSON metadata.

        The checksums :func:`save_prior` adds and :attr:`path` are left out, so a prior has the same fingerprint
        before it is saved, after it is loaded, and wherever the file lies.

        Raises:
            PriorError: the metadata is not JSON-serialisable.
        """
        digest = hashlib.sha256(_tensors_sha256(self.tensors).encode())
        digest.update(b"\0")
        digest.update(_canonical_json(_without_checksums(self.metadata)).encode())
        return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ hashing
def _tensor_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """Hex SHA-256 over ``tensors``: per sorted name, a JSON header (name, dtype, shape, byte count), then the bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        data = _tensor_bytes(tensor)
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape), len(data)])
        digest.update(header.encode() + b"\n")
        digest.update(data)
    return digest.hexdigest()


def _canonical_json(value: Any, where: str = "the prior") -> str:
    """``value`` as JSON with sorted keys, no spaces and no NaN (the form that is hashed and stored)."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise PriorError(f"{where}: its metadata is not JSON-serialisable ({one_line(error)})") from None


def _without_checksums(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metadata.items() if key not in _CHECKSUM_KEYS}


def _metadata_sha256(metadata: Mapping[str, Any], where: str = "the prior") -> str:
    return hashlib.sha256(_canonical_json(_without_checksums(metadata), where).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ validation
def _describe(prior_path: Path | None) -> str:
    return f"prior {prior_path}" if prior_path is not None else "the prior"


def _check_metadata(metadata: Any, where: str) -> None:
    """Refuse metadata that misses a key or holds a value of the wrong kind (``where`` names the prior)."""
    if not isinstance(metadata, Mapping):
        raise PriorError(f"{where}: its metadata is not a JSON object")
    fmt = metadata.get("format")
    if fmt != PRIOR_FORMAT:
        raise PriorError(f"{where} has format {fmt!r}; this version of lightning_fms reads {PRIOR_FORMAT!r}")
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing:
        raise PriorError(f"{where}: its metadata lacks {', '.join(map(repr, missing))}")

    def bad(key: str, expected: str) -> PriorError:
        return PriorError(f"{where}: metadata {key!r} must be {expected}, got {metadata[key]!r}")

    if metadata["searcher"] not in PRIOR_SEARCHERS:
        raise bad("searcher", " or ".join(map(repr, PRIOR_SEARCHERS)))
    if metadata["weights"] not in ("none", *FEATURIZERS):
        raise bad("weights", f"'none' or a featurizer ({', '.join(FEATURIZERS)})")
    if metadata["curve"] not in CURVE_ENCODERS:
        raise bad("curve", " or ".join(map(repr, CURVE_ENCODERS)))
    if not isinstance(metadata["frozen_layers"], bool):
        raise bad("frozen_layers", "true or false")
    hub_key = metadata["hub_key"]
    if hub_key is not None and (not isinstance(hub_key, str) or not hub_key):
        raise bad("hub_key", "a parameter name or null")
    _non_hub_parameters(metadata["space"], where)
    if isinstance(hub_key, str) and hub_key in metadata["space"]:
        raise PriorError(f"{where}: metadata 'space' holds the hub choice {hub_key!r} (non-hub parameters only)")
    columns = metadata["columns"]
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise bad("columns", "a list of column names")
    sources = metadata["sources"]
    if not isinstance(sources, list):
        raise bad("sources", "a list")
    for i, source in enumerate(sources):
        if not isinstance(source, Mapping) or any(key not in source for key in _SOURCE_KEYS):
            raise PriorError(f"{where}: metadata source #{i} must have {', '.join(_SOURCE_KEYS)}, got {source!r}")
        rows = source["rows"]
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise PriorError(f"{where}: metadata source #{i} 'rows' must be a count, got {rows!r}")
    if not isinstance(metadata["training"], Mapping):
        raise bad("training", "a mapping")


def _non_hub_parameters(spec: Any, where: str) -> dict[str, dict[str, Any]]:
    """The prior's ``space`` metadata, each parameter validated and put in its recipe form."""
    if not isinstance(spec, Mapping):
        raise PriorError(f"{where}: metadata 'space' must be a mapping of parameter name to spec, got {spec!r}")
    params = {}
    for name, param_spec in spec.items():
        if isinstance(param_spec, Mapping) and param_spec.get("type") == "hub":
            raise PriorError(f"{where}: metadata 'space' holds the hub choice {name!r} (non-hub parameters only)")
        try:
            params[str(name)] = parameter_from_dict(str(name), param_spec)
        except FMSError as error:
            raise PriorError(f"{where}: metadata 'space': {error}") from None
    return SearchSpace(params).to_dict() if params else {}


# ------------------------------------------------------------------------------------------------ the file
def save_prior(prior: Prior, path: str | os.PathLike[str]) -> Path:
    """Write ``prior`` to ``path`` (one safetensors file, written atomically).

    The metadata is validated first and stored as JSON under the header key :data:`METADATA_KEY`, with
    ``tensors_sha256`` and ``metadata_sha256`` added (``prior.metadata`` itself is left as it is).

    Args:
        prior: The prior (its tensors are written from CPU copies).
        path: The file to write (its folder is created).

    Returns:
        The path written.

    Raises:
        PriorError: metadata that is incomplete, of the wrong kind or not JSON-serialisable; a tensor name that is
            no string or a value that is no tensor.
    """
    from safetensors.torch import save

    path = Path(path)
    where = f"prior for {path}"
    _check_metadata(prior.metadata, where)
    tensors: dict[str, Tensor] = {}
    for name, tensor in prior.tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise PriorError(f"{where}: tensors must map names to tensors, got {name!r}: {type(tensor).__name__}")
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    metadata = _without_checksums(prior.metadata)
    metadata["tensors_sha256"] = _tensors_sha256(tensors)
    metadata["metadata_sha256"] = _metadata_sha256(metadata, where)
    atomic_write_bytes(path, save(tensors, metadata={METADATA_KEY: _canonical_json(metadata, where)}))
    return path


def _looks_pickled(data: bytes) -> bool:
    """``torch.save`` writes a zip archive; a plain pickle starts with its protocol opcode."""
    return data.startswith(b"PK\x03\x04") or data.startswith(b"\x80")


def load_prior(path: str | os.PathLike[str]) -> Prior:
    """Read a prior file with safetensors (nothing in it is ever unpickled) and check that it is intact.

    Args:
        path: A file written by :func:`save_prior`.

    Returns:
        The prior, with :attr:`Prior.path` set.

    Raises:
        PriorError: the file is missing or not safetensors (truncated, random bytes, a pickle), its metadata is
            missing, not JSON, incomplete or of another format version, or the file was modified after it was
            written (its tensors or metadata no longer match the stored checksums).
    """
    from safetensors.torch import load

    path = Path(path)
    where = f"prior {path}"
    if not path.exists():
        raise PriorError(f"{where} does not exist")
    if not path.is_file():
        raise PriorError(f"{where} is not a file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PriorError(f"cannot read {where}: {error.strerror}") from None
    try:
        tensors = load(data)
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
    except Exception as error:  # safetensors raises its own SafetensorError, and others on garbage
        hint = "; it looks like a pickle, and priors are never unpickled" if _looks_pickled(data) else ""
        raise PriorError(f"{where} is not a safetensors file ({one_line(error, 120)}){hint}") from None
    text = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if text is None:
        raise PriorError(f"{where} has no {METADATA_KEY!r} metadata (it was not written by lightning-fms pretrain)")
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise PriorError(f"{where}: its {METADATA_KEY!r} metadata is not JSON ({error.msg})") from None
    if not isinstance(metadata, dict):
        raise PriorError(f"{where}: its metadata is not a JSON object")
    if metadata.get("format") != PRIOR_FORMAT:
        raise PriorError(
            f"{where} has format {metadata.get('format')!r}; this version of lightning_fms reads {PRIOR_FORMAT!r}"
        )
    modified = f"{where} was modified after it was written (tampered or corrupt)"
    for key in _CHECKSUM_KEYS:
        if not isinstance(metadata.get(key), str) or not _HEX64.fullmatch(metadata[key]):
            raise PriorError(f"{modified}: its metadata lacks a valid {key!r}")
    if _tensors_sha256(tensors) != metadata["tensors_sha256"]:
        raise PriorError(f"{modified}: its tensors do not match tensors_sha256")
    if _metadata_sha256(metadata) != metadata["metadata_sha256"]:
        raise PriorError(f"{modified}: its metadata does not match metadata_sha256")
    _check_metadata(metadata, where)
    return Prior(tensors=tensors, metadata=metadata, path=path)


# ------------------------------------------------------------------------------------------------ does it fit?
def _kind(spec: Mapping[str, Any]) -> str:
    return {"float": "a float", "int": "an int", "categorical": "a categorical"}.get(spec["type"], spec["type"])


def _parameter_difference(name: str, mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> str | None:
    """How the study's parameter ``name`` (``theirs``) differs from the prior's (``mine``), or ``None``."""
    if mine["type"] != theirs["type"]:
        return f"parameter {name!r} is {_kind(mine)} in the prior, {_kind(theirs)} in the study"
    if mine["type"] == "categorical":
        if sorted(map(repr, mine["choices"])) != sorted(map(repr, theirs["choices"])):
            return f"parameter {name!r} has choices {mine['choices']} in the prior, {theirs['choices']} in the study"
        return None
    keys = [key for key in ("low", "high", "log") if mine[key] != theirs[key]]
    if not keys:
        return None
    prior_side = ", ".join(f"{key}={mine[key]}" for key in keys)
    study_side = ", ".join(f"{key}={theirs[key]}" for key in keys)
    return f"parameter {name!r} has {prior_side} in the prior, {study_side} in the study"


def check_prior_fits(
    prior: Prior,
    *,
    searcher: str,
    weights: str,
    curve: str,
    frozen_layers: bool,
    space: SearchSpace,
) -> None:
    """Refuse, in one line, a prior that was not learned for this study's surrogate and space.

    The searcher, the featurizer, the curve setting, the frozen-layer setting and the non-hub parameters
    (names, types, bounds, log scales, choices; not their order) must be those the prior was learned for, and
    the study must have a hub choice exactly when the prior has one. The hub *entries* may differ: carrying
    what was learned on one hub's studies over to another hub is the point of a prior (entries are matched by
    name where both hubs have them, see :mod:`lightning_fms.transfer.columns`); so may the hub choice's name.

    Args:
        prior: The prior (from :func:`load_prior`, or built in memory).
        searcher: The study's searcher name.
        weights: The study's featurizer name, resolved (``"none"`` or a featurizer, not ``"auto"``).
        curve: The study's learning-curve input (``"cnn"`` or ``"none"``).
        frozen_layers: Whether the study uses the frozen-layer fidelity.
        space: The study's search space.

    Raises:
        PriorError: what differs, named in one line.
    """
    meta = prior.metadata
    where = _describe(prior.path)
    for key, study in (("searcher", searcher), ("weights", weights), ("curve", curve)):
        if meta.get(key) != study:
            what = {"searcher": "searcher", "weights": "featurizer (weights)", "curve": "curve input"}[key]
            raise PriorError(f"{where} was learned for {what} {meta.get(key)!r}; this study uses {study!r}")
    if meta.get("frozen_layers") != bool(frozen_layers):
        learned = "with" if meta.get("frozen_layers") else "without"
        study_side = "with" if frozen_layers else "without"
        raise PriorError(f"{where} was learned {learned} the frozen-layer fidelity; this study runs {study_side} it")
    if (meta.get("hub_key") is None) != (space.hub_key is None):
        if space.hub_key is None:
            raise PriorError(f"{where} was learned with a hub choice ({meta.get('hub_key')!r}); this space has none")
        raise PriorError(f"{where} was learned without a hub choice; this space has one ({space.hub_key!r})")
    prior_params = _non_hub_parameters(meta.get("space"), where)
    study_params = {name: spec for name, spec in space.to_dict().items() if not isinstance(space[name], HubChoice)}
    problems = [f"the study lacks the prior's parameter {name!r}" for name in prior_params if name not in study_params]
    problems += [
        f"the study's parameter {name!r} is not in the prior" for name in study_params if name not in prior_params
    ]
    for name in prior_params:
        if name in study_params:
            difference = _parameter_difference(name, prior_params[name], study_params[name])
            if difference is not None:
                problems.append(difference)
    if problems:
        raise PriorError(f"{where} was learned for another search space: {'; '.join(problems)}")
