"""The model hub: named pretrained checkpoints of several architectures, safe by construction.

A hub is a YAML file listing *entries*. Each entry names an ``nn.Module`` class by import path, the
keyword arguments that build it, and a weights file next to the YAML (``.safetensors`` preferred)::

    name: demo
    entries:
      - name: cnn-s
        family: cnn
        class_path: lightning_fms.zoo.SmallCNN
        init_args: {image_size: 8, num_classes: 5, width: 8}
        weights: cnn-s.safetensors
        sha256: 3f1c...
        metadata: {params: 5213, source_val_acc: 0.97}

Loading never unpickles code: ``.safetensors`` files hold raw tensors only, and any other file goes
through ``torch.load(..., weights_only=True)`` and must be a flat ``{name: Tensor}`` dict. Every
problem a user can cause raises :class:`~lightning_fms.errors.FMSError` (or its subclass
:class:`~lightning_fms.errors.CheckpointError` for weights files) with a one-line message naming the
problem and the file.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from lightning_fms.atomic import atomic_write_text, sha256_file
from lightning_fms.errors import CheckpointError, FMSError, one_line

__all__ = ["HubEntry", "ModelHub", "bind_weight_files", "load_weights_file", "sha256_file"]

_ENTRY_REQUIRED = ("name", "family", "class_path", "weights")
_ENTRY_OPTIONAL = ("init_args", "sha256", "metadata")
_HUB_KEYS = ("name", "entries", "metadata")


def _one_line(error: BaseException) -> str:
    """An exception's message on one line of at most 300 characters (hub errors quote library messages)."""
    return one_line(error, limit=300)


@dataclass(frozen=True)
class HubEntry:
    """One pretrained checkpoint of the hub.

    Attributes:
        name: Unique name of the entry within its hub (e.g. ``"cnn-s"``).
        family: Architecture family (e.g. ``"cnn"``); entries of one family share ``class_path``.
        class_path: Import path of an ``nn.Module`` subclass, e.g. ``"lightning_fms.zoo.SmallCNN"``.
        init_args: Keyword arguments of the class's constructor (YAML-safe values).
        weights: Absolute path of the weights file (``.safetensors``, or a ``torch.save``-d flat dict
            of tensors).
        sha256: Hex SHA-256 of the weights file, verified before every load; ``None`` skips the check.
        metadata: Free-form, YAML-safe information about the entry (e.g. ``params``,
            ``source_val_acc``); never read by :meth:`ModelHub.build`.

    """

    name: str
    family: str
    class_path: str
    init_args: dict[str, Any] = field(hash=False)
    weights: Path
    sha256: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", Path(self.weights))
        object.__setattr__(self, "init_args", dict(self.init_args or {}))
        object.__setattr__(self, "metadata", dict(self.metadata or {}))
        if self.sha256 is not None:
            object.__setattr__(self, "sha256", str(self.sha256).lower())


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read weights file {path}: {_one_line(error)}") from error


def load_weights_file(path: str | os.PathLike[str], sha256: str | None = None) -> dict[str, Tensor]:
    """Load a flat state dict without ever unpickling code.

    The file is read once; when ``sha256`` is given the bytes are verified *before* they are parsed,
    and exactly the verified bytes are loaded.

    Args:
        path: A ``.safetensors`` file (loaded with ``safetensors``) or any other file written by
            ``torch.save`` (loaded with ``torch.load(..., map_location="cpu", weights_only=True)``),
            which must hold a flat ``dict[str, Tensor]``.
        sha256: Expected hex SHA-256 of the file, or ``None`` to skip the check.

    Returns:
        The tensors by name, on the CPU.

    Raises:
        CheckpointError: If the file is missing, tampered with (hash mismatch), corrupt, not a flat
            dict of tensors, or a pickle that carries code.

    """
    path = Path(path)
    data = _read_bytes(path)
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256.lower():
            raise CheckpointError(
                f"weights file {path} was tampered with: sha256 is {actual}, the hub expects {sha256.lower()}"
            )
    if path.suffix == ".safetensors":
        from safetensors.torch import load as load_safetensors

        try:
            state = load_safetensors(data)
        except Exception as error:  # safetensors raises its own SafetensorError, and others on garbage
            raise CheckpointError(f"corrupt safetensors file {path}: {_one_line(error)}") from error
    else:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"refused to load {path}: it contains pickled code (only plain tensors are allowed; "
                "convert it to .safetensors)"
            ) from error
        except Exception as error:
            raise CheckpointError(f"cannot read weights file {path}: {_one_line(error)}") from error
    if not isinstance(state, Mapping):
        raise CheckpointError(f"weights file {path} must hold a flat dict of tensors, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(
                f"weights file {path} must hold a flat dict of tensors, but entry {key!r} is {type(value).__name__}"
            )
    return dict(state)


def _import_module_class(class_path: str, where: str) -> type[nn.Module]:
    module_name, _, attr = class_path.rpartition(".")
    if not module_name or not attr:
        raise FMSError(f"class_path {class_path!r} of {where} is not a dotted import path like 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise FMSError(
            f"class_path {class_path!r} of {where} does not import: {_one_line(error)}",
        ) from error
    cls = getattr(module, attr, None)
    if cls is None:
        raise FMSError(f"class_path {class_path!r} of {where} does not import: module {module_name!r} has no {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise FMSError(f"class_path {class_path!r} of {where} is not an nn.Module subclass")
    return cls


class ModelHub:
    """An ordered collection of :class:`HubEntry` with unique names.

    Args:
        entries: The entries, in order.
        name: Name of the hub (used in messages and written to YAML).

    Raises:
        FMSError: If two entries share a name.

    """

    def __init__(self, entries: Sequence[HubEntry], name: str = "hub", metadata: Mapping[str, Any] | None = None):
        self.name = str(name)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.path: Path | None = None
        self._entries: dict[str, HubEntry] = {}
        for entry in entries:
            if not isinstance(entry, HubEntry):
                raise FMSError(f"hub {self.name!r}: entries must be HubEntry, got {type(entry).__name__}")
            if entry.name in self._entries:
                raise FMSError(f"hub {self._where()}: duplicate entry name {entry.name!r}")
            self._entries[entry.name] = entry

    def _where(self) -> str:
        return f"{self.name!r} ({self.path})" if self.path is not None else repr(self.name)

    # -- YAML -----------------------------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> ModelHub:
        """Read a hub from YAML; relative ``weights`` paths are resolved against the YAML's folder.

        Raises:
            FMSError: If the file is missing, is not valid YAML, has unknown or missing keys, wrong
                value types, or duplicate entry names.

        """
        path = Path(path)
        if not path.is_file():
            raise FMSError(f"hub file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as error:
            raise FMSError(f"malformed hub file {path}: {_one_line(error)}") from error
        if not isinstance(raw, dict):
            raise FMSError(f"malformed hub file {path}: expected a mapping with an 'entries' list")
        unknown = sorted(str(k) for k in raw if k not in _HUB_KEYS)
        if unknown:
            raise FMSError(f"malformed hub file {path}: unknown key(s) {unknown} (allowed: {list(_HUB_KEYS)})")
        entries_raw = raw.get("entries")
        if not isinstance(entries_raw, list):
            raise FMSError(f"malformed hub file {path}: 'entries' must be a list")
        hub_name = raw.get("name", path.parent.name or "hub")
        if not isinstance(hub_name, str):
            raise FMSError(f"malformed hub file {path}: 'name' must be a string")
        hub_meta = raw.get("metadata") or {}
        if not isinstance(hub_meta, dict):
            raise FMSError(f"malformed hub file {path}: 'metadata' must be a mapping")
        base = path.parent.resolve()
        entries = [cls._entry_from_dict(item, index, path, base) for index, item in enumerate(entries_raw)]
        try:
            hub = cls(entries, name=hub_name, metadata=hub_meta)
        except FMSError as error:
            raise FMSError(f"malformed hub file {path}: {error}") from error
        hub.path = path.resolve()
        return hub

    @staticmethod
    def _entry_from_dict(item: Any, index: int, path: Path, base: Path) -> HubEntry:
        where = f"entry #{index}"
        if not isinstance(item, dict):
            raise FMSError(f"malformed hub file {path}: {where} must be a mapping")
        if isinstance(item.get("name"), str):
            where = f"entry {item['name']!r}"
        unknown = sorted(str(k) for k in item if k not in _ENTRY_REQUIRED + _ENTRY_OPTIONAL)
        if unknown:
            allowed = list(_ENTRY_REQUIRED + _ENTRY_OPTIONAL)
            raise FMSError(f"malformed hub file {path}: {where} has unknown key(s) {unknown} (allowed: {allowed})")
        missing = [k for k in _ENTRY_REQUIRED if k not in item]
        if missing:
            raise FMSError(f"malformed hub file {path}: {where} lacks key(s) {missing}")
        for key in _ENTRY_REQUIRED:
            if not isinstance(item[key], str) or not item[key]:
                raise FMSError(f"malformed hub file {path}: {where}: '{key}' must be a non-empty string")
        init_args = item.get("init_args") or {}
        if not isinstance(init_args, dict) or not all(isinstance(k, str) for k in init_args):
            raise FMSError(f"malformed hub file {path}: {where}: 'init_args' must be a mapping of names to values")
        sha = item.get("sha256")
        if sha is not None and not (
            isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha.lower())
        ):
            raise FMSError(f"malformed hub file {path}: {where}: 'sha256' must be 64 hex digits")
        metadata = item.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise FMSError(f"malformed hub file {path}: {where}: 'metadata' must be a mapping")
        weights = Path(os.path.expanduser(item["weights"]))
        if not weights.is_absolute():
            weights = base / weights
        return HubEntry(
            name=item["name"],
            family=item["family"],
            class_path=item["class_path"],
            init_args=init_args,
            weights=weights.resolve(),
            sha256=sha,
            metadata=metadata,
        )

    def to_yaml(self, path: str | os.PathLike[str]) -> Path:
        """Write the hub as YAML, with ``weights`` relative to the YAML's folder where possible.

        The file is written atomically (temporary file + rename).

        Returns:
            The path written.

        Raises:
            FMSError: If ``init_args`` or ``metadata`` hold values that YAML cannot represent safely.

        """
        path = Path(path)
        base = path.parent.resolve()
        entries = []
        for entry in self:
            weights = entry.weights.resolve()
            try:
                weights_text = Path(os.path.relpath(weights, base)).as_posix()
            except ValueError:  # another drive on Windows
                weights_text = str(weights)
            item: dict[str, Any] = {
                "name": entry.name,
                "family": entry.family,
                "class_path": entry.class_path,
                "init_args": dict(entry.init_args),
                "weights": weights_text,
            }
            if entry.sha256 is not None:
                item["sha256"] = entry.sha256
            if entry.metadata:
                item["metadata"] = dict(entry.metadata)
            entries.append(item)
        document: dict[str, Any] = {"name": self.name}
        if self.metadata:
            document["metadata"] = dict(self.metadata)
        document["entries"] = entries
        try:
            text = yaml.safe_dump(document, sort_keys=False, default_flow_style=None)
        except yaml.YAMLError as error:
            raise FMSError(f"cannot write hub {self.name!r} to {path}: {_one_line(error)}") from error
        atomic_write_text(path, text)
        return path

    # -- access ---------------------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Entry names, in hub order."""
        return list(self._entries)

    @property
    def families(self) -> dict[str, list[str]]:
        """Entry names grouped by family (families and names in hub order)."""
        groups: dict[str, list[str]] = {}
        for entry in self._entries.values():
            groups.setdefault(entry.family, []).append(entry.name)
        return groups

    def entry(self, name: str) -> HubEntry:
        """Return the entry called ``name``.

        Raises:
            FMSError: If there is no such entry (the message lists the known names).

        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise FMSError(
                f"unknown hub entry {name!r} in hub {self._where()}; known entries: {', '.join(self.names) or '(none)'}"
            ) from None

    def subset(self, names: Sequence[str]) -> ModelHub:
        """Return a hub with only the given entries (in the given order).

        Raises:
            FMSError: If a name is unknown.

        """
        hub = ModelHub([self.entry(n) for n in names], name=self.name, metadata=self.metadata)
        hub.path = self.path
        return hub

    def build(self, name: str) -> nn.Module:
        """Instantiate an entry's architecture and load its weights strictly.

        The weights file's SHA-256 is verified first (when the entry has one); the tensors are then
        loaded with :func:`load_weights_file`, so no code is ever unpickled. Building does not advance
        the global (CPU) random state.

        Returns:
            The module with the entry's pretrained weights (in training mode, on the CPU).

        Raises:
            FMSError: If the entry is unknown, its ``class_path`` does not import or is not an
                ``nn.Module`` subclass, or ``init_args`` do not fit the constructor.
            CheckpointError: If the weights file is missing, tampered with, corrupt, carries pickled
                code, or its keys/shapes do not match the architecture.

        """
        entry = self.entry(name)
        where = f"hub entry {entry.name!r}"
        cls = _import_module_class(entry.class_path, where)
        try:
            with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the global RNG alone
                module = cls(**entry.init_args)
        except Exception as error:
            raise FMSError(
                f"cannot build {where}: {entry.class_path}(**{entry.init_args}) failed: {_one_line(error)}"
            ) from error
        state = load_weights_file(entry.weights, sha256=entry.sha256)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise CheckpointError(
                f"weights file {entry.weights} does not fit {where} ({entry.class_path}): {_one_line(error)}"
            ) from error
        return module

    def verify(self) -> None:
        """Check that every entry's weights file exists and matches its SHA-256 (when given).

        Raises:
            CheckpointError: On the first missing or tampered file.

        """
        for entry in self:
            digest = sha256_file(entry.weights)
            if entry.sha256 is not None and digest != entry.sha256:
                raise CheckpointError(
                    f"weights file {entry.weights} was tampered with: sha256 is {digest}, "
                    f"the hub expects {entry.sha256}"
                )

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[HubEntry]:
        """Iterate over the entries (not the names), in hub order."""
        return iter(list(self._entries.values()))

    def __contains__(self, name: object) -> bool:
        if isinstance(name, HubEntry):
            return self._entries.get(name.name) == name
        return isinstance(name, str) and name in self._entries

    def __repr__(self) -> str:
        return f"ModelHub(name={self.name!r}, entries={self.names})"


def bind_weight_files(config: Mapping[str, Any], hub_key: str | None, hub: ModelHub | None) -> dict[str, Any]:
    """A configuration as a training script receives it: the hub choice's entry replaced by its weights file.

    The hub choice is named by the config key (or command-line argument) through which the script receives its
    pretrained weights, e.g. ``model.pretrained``; its value, an entry name, becomes the absolute path of that
    entry's weights file. ``FMSLightningCLI``'s trials and the commands of ``lightning-fms agent`` both receive
    the hub choice this way.

    Args:
        config: A trial's configuration (space keys to values).
        hub_key: The space's hub choice (``None``: none; the configuration is returned as it is).
        hub: The hub whose entries the choice names.

    Raises:
        FMSError: an entry the hub does not have.
    """
    out = dict(config)
    if hub_key is not None and hub is not None and hub_key in out:
        out[hub_key] = str(Path(hub.entry(str(out[hub_key])).weights).absolute())
    return out
