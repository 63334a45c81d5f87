"""Build model hubs by pretraining zoo architectures on the digits source task."""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lightning_fms.atomic import atomic_output
from lightning_fms.errors import FMSError
from lightning_fms.hub import HubEntry, ModelHub, _import_module_class, sha256_file
from lightning_fms.threads import torch_threads
from lightning_fms.training.quiet import quiet_lightning

__all__ = [
    "CNN_HUB_SPECS",
    "DEFAULT_DEMO_EPOCHS",
    "DEMO_HUB_SPECS",
    "build_cnn_hub",
    "build_demo_hub",
    "build_hub",
    "default_cache_dir",
    "load_or_build_hub",
    "quiet_lightning",
]

_SPEC_KEYS = {"name", "family", "class_path", "init_args", "lr", "weight_decay", "epochs", "batch_size", "label_noise"}
_BUILDER_VERSION = 1

DEFAULT_DEMO_EPOCHS = 15
"""Pretraining epochs of the demo hub."""

DEMO_HUB_SPECS: list[dict[str, Any]] = [
    {"name": "mlp-s", "family": "mlp", "class_path": "lightning_fms.zoo.MLP", "init_args": {"hidden": 32}},
    {"name": "mlp-m", "family": "mlp", "class_path": "lightning_fms.zoo.MLP", "init_args": {"hidden": 96}},
    {"name": "cnn-s", "family": "cnn", "class_path": "lightning_fms.zoo.SmallCNN", "init_args": {"width": 12}},
    {"name": "cnn-m", "family": "cnn", "class_path": "lightning_fms.zoo.SmallCNN", "init_args": {"width": 24}},
    {"name": "resnet-s", "family": "resnet", "class_path": "lightning_fms.zoo.TinyResNet", "init_args": {"width": 8}},
    {"name": "resnet-m", "family": "resnet", "class_path": "lightning_fms.zoo.TinyResNet", "init_args": {"width": 16}},
    {
        "name": "vit-s",
        "family": "vit",
        "class_path": "lightning_fms.zoo.TinyViT",
        "init_args": {"patch_size": 4, "dim": 32, "depth": 2, "heads": 4},
    },
    {
        "name": "deepsets-s",
        "family": "deepsets",
        "class_path": "lightning_fms.zoo.DeepSets",
        "init_args": {"hidden": 64},
    },
]
"""Specs of the demo hub: five families, two widths each for mlp, cnn and resnet."""


CNN_HUB_WIDTHS = (4, 8, 12, 16)
"""Widths (first-stage channels) of the CNN hub's :class:`~lightning_fms.zoo.SmallCNN` entries."""

CNN_HUB_PRETRAINING = (("a", 2), ("a", 5), ("b", 5), ("a", 15), ("b", 15))
"""``(replica, epochs)`` per width: the entry's name holds both, and its name seeds its initialisation."""

CNN_HUB_SPECS: list[dict[str, Any]] = [
    {
        "name": f"cnn{width:02d}-e{epochs:02d}{replica}",
        "family": "cnn",
        "class_path": "lightning_fms.zoo.SmallCNN",
        "init_args": {"width": width},
        "epochs": epochs,
    }
    for width in CNN_HUB_WIDTHS
    for replica, epochs in CNN_HUB_PRETRAINING
]
"""Specs of the CNN hub: one architecture (SmallCNN), 4 widths x 5 pretrained initialisations (20 entries).

Entries of one width differ in their seed (derived from the name) and in how long they were pretrained
on digits 0-4 (2, 5 or 15 epochs), so the hub choice is about initialisations, not architectures.
"""


def default_cache_dir() -> Path:
    """Return ``$LIGHTNING_FMS_CACHE`` or ``~/.cache/lightning_fms``."""
    env = os.environ.get("LIGHTNING_FMS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_fms"


def _check_spec(spec: Mapping[str, Any], index: int) -> None:
    if not isinstance(spec, Mapping):
        raise FMSError(f"hub spec #{index} must be a mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise FMSError(f"hub spec #{index} has unknown key(s) {unknown} (allowed: {sorted(_SPEC_KEYS)})")
    for key in ("name", "family", "class_path"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise FMSError(f"hub spec #{index} needs a non-empty string '{key}'")


def _fingerprint(specs: Sequence[Mapping[str, Any]], source: str, epochs: int, seed: int) -> str:
    payload = {"version": _BUILDER_VERSION, "specs": specs, "source": source, "epochs": epochs, "seed": seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _init_args(spec: Mapping[str, Any], image_size: int, num_classes: int) -> dict[str, Any]:
    """Return the spec's ``init_args`` with ``image_size``/``num_classes`` filled in when the class takes them."""
    cls = _import_module_class(spec["class_path"], f"hub spec {spec['name']!r}")
    args = dict(spec.get("init_args") or {})
    params = inspect.signature(cls.__init__).parameters
    if "image_size" in params:
        args.setdefault("image_size", image_size)
    if "num_classes" in params:
        args.setdefault("num_classes", num_classes)
    return args


def build_hub(
    out_dir: str | os.PathLike[str],
    entries: Sequence[Mapping[str, Any]],
    source: str = "source",
    epochs: int = DEFAULT_DEMO_EPOCHS,
    seed: int = 0,
    *,
    name: str | None = None,
    verbose: bool = False,
    num_threads: int | None = 1,
) -> ModelHub:
    """Pretrain each spec on a digits task, save ``<name>.safetensors`` files and ``hub.yaml`` under ``out_dir``.

    Each spec is a mapping with ``name``, ``family``, ``class_path``, optional ``init_args`` (``image_size``
    and ``num_classes`` are filled in from the task when the class takes them), and optional pretraining
    overrides ``lr`` (default 0.05), ``weight_decay`` (5e-4), ``epochs``, ``batch_size`` (32) and
    ``label_noise`` (0: the fraction of the source's training labels redrawn at random). Training
    is a plain CPU Lightning Trainer without logger, checkpoints, progress bar or model summary, with a
    per-entry seed derived from ``seed`` and the entry's name; the caller's RNG state is left untouched.

    Args:
        out_dir: Folder for the weights and ``hub.yaml`` (created if needed).
        entries: The specs, in hub order.
        source: The digits task to pretrain on (``"source"``, ``"target"`` or ``"all"``).
        epochs: Pretraining epochs (per-spec ``epochs`` overrides it).
        seed: Base seed of the data split and of each entry's initialisation and shuffling.
        name: Name of the hub; defaults to ``out_dir``'s folder name.
        verbose: Print one line per trained entry.
        num_threads: Torch intra-op threads while training (restored afterwards); the zoo's models are
            too small to gain from more, and one thread avoids thread oversubscription slowdowns on a
            busy machine. ``None`` keeps the current setting.

    Returns:
        The hub read back from ``out_dir/hub.yaml``. Entry metadata holds ``params``, ``source_val_acc``,
        ``pretrain_epochs`` and ``pretrain_seconds``.

    Raises:
        FMSError: On a malformed spec, duplicate names, or a class_path that does not import.

    """
    from lightning.pytorch import Trainer

    from lightning_fms.zoo.classifier import ImageClassifier
    from lightning_fms.zoo.digits import DigitsDataModule

    specs = [dict(copy.deepcopy(spec)) for spec in entries]
    for index, spec in enumerate(specs):
        _check_spec(spec, index)
    names = [spec["name"] for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FMSError(f"hub specs have duplicate names {duplicates}")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)

    hub_entries: list[HubEntry] = []
    for spec in specs:
        entry_epochs = int(spec.get("epochs", epochs))
        entry_seed = (seed * 1_000_003 + zlib.crc32(spec["name"].encode())) % (2**31)
        datamodule = DigitsDataModule(
            task=source,
            batch_size=int(spec.get("batch_size", 32)),
            seed=seed,
            label_noise=float(spec.get("label_noise", 0.0)),
        )
        init_args = _init_args(spec, datamodule.image_size, datamodule.num_classes)
        cls = _import_module_class(spec["class_path"], f"hub spec {spec['name']!r}")
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]), quiet_lightning(), torch_threads(num_threads):
            torch.manual_seed(entry_seed)
            net = cls(**init_args)
            module = ImageClassifier(
                net,
                lr=float(spec.get("lr", 0.05)),
                weight_decay=float(spec.get("weight_decay", 5e-4)),
                momentum=0.9,
                max_epochs=entry_epochs,
                reset_head=False,
            )
            trainer = Trainer(
                max_epochs=entry_epochs,
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                deterministic=False,
                default_root_dir=str(out),
            )
            trainer.fit(module, datamodule=datamodule)
        seconds = time.perf_counter() - start
        val_acc = float(trainer.callback_metrics.get("val_acc", torch.tensor(float("nan"))))
        state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
        weights = out / f"{spec['name']}.safetensors"
        with atomic_output(weights) as tmp:
            save_file(state, str(tmp))
        params = sum(p.numel() for p in net.parameters())
        hub_entries.append(
            HubEntry(
                name=spec["name"],
                family=spec["family"],
                class_path=spec["class_path"],
                init_args=init_args,
                weights=weights,
                sha256=sha256_file(weights),
                metadata={
                    "params": int(params),
                    "source_val_acc": round(val_acc, 4),
                    "pretrain_epochs": entry_epochs,
                    **({"label_noise": float(spec["label_noise"])} if "label_noise" in spec else {}),
                    "pretrain_seconds": round(seconds, 2),
                },
            )
        )
        if verbose:
            print(f"  pretrained {spec['name']:<12} {params:>7} params  val_acc={val_acc:.3f}  ({seconds:.1f}s)")

    metadata = {
        "builder": "lightning_fms.zoo.build_hub",
        "source": source,
        "epochs": epochs,
        "seed": seed,
        "fingerprint": _fingerprint(specs, source, epochs, seed),
    }
    hub = ModelHub(hub_entries, name=name or out.name, metadata=metadata)
    hub.to_yaml(out / "hub.yaml")
    return ModelHub.from_yaml(out / "hub.yaml")


def load_or_build_hub(
    out_dir: str | os.PathLike[str],
    entries: Sequence[Mapping[str, Any]],
    source: str = "source",
    epochs: int = DEFAULT_DEMO_EPOCHS,
    seed: int = 0,
    *,
    force: bool = False,
    name: str | None = None,
    verbose: bool = False,
) -> ModelHub:
    """Return the hub cached in ``out_dir`` when it was built from the same specs and its files verify; else build it.

    Args:
        out_dir: The hub folder (``out_dir/hub.yaml``).
        entries: The specs (see :func:`build_hub`).
        source: The pretraining task.
        epochs: Pretraining epochs.
        seed: Base seed.
        force: Rebuild even when a valid cached hub exists.
        name: Name of the hub.
        verbose: Print progress while building.

    Returns:
        The hub.

    """
    yaml_path = Path(out_dir).expanduser() / "hub.yaml"
    if not force and yaml_path.is_file():
        specs = [dict(spec) for spec in entries]
        try:
            hub = ModelHub.from_yaml(yaml_path)
            hub.verify()
            if hub.metadata.get("fingerprint") == _fingerprint(specs, source, epochs, seed):
                return hub
        except FMSError:
            pass
    return build_hub(out_dir, entries, source=source, epochs=epochs, seed=seed, name=name, verbose=verbose)


def build_demo_hub(
    out_dir: str | os.PathLike[str] | None = None,
    epochs: int = DEFAULT_DEMO_EPOCHS,
    force: bool = False,
    seed: int = 0,
    verbose: bool = False,
) -> ModelHub:
    """Return the demo hub (:data:`DEMO_HUB_SPECS` pretrained on digits 0-4), building it unless cached.

    Args:
        out_dir: The hub folder; defaults to ``default_cache_dir() / "hubs" / "demo"``.
        epochs: Pretraining epochs.
        force: Rebuild even when a valid cached hub exists.
        seed: Base seed.
        verbose: Print progress while building.

    Returns:
        The demo hub.

    """
    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "hubs" / "demo"
    return load_or_build_hub(
        out, DEMO_HUB_SPECS, source="source", epochs=epochs, seed=seed, force=force, name="demo", verbose=verbose
    )


def build_cnn_hub(
    out_dir: str | os.PathLike[str] | None = None,
    epochs: int = DEFAULT_DEMO_EPOCHS,
    force: bool = False,
    seed: int = 0,
    verbose: bool = False,
) -> ModelHub:
    """Return the CNN hub (:data:`CNN_HUB_SPECS` pretrained on digits 0-4), building it unless cached.

    Args:
        out_dir: The hub folder; defaults to ``default_cache_dir() / "hubs" / "cnn"``.
        epochs: Pretraining epochs of specs without their own ``epochs`` (every shipped spec has one).
        force: Rebuild even when a valid cached hub exists.
        seed: Base seed.
        verbose: Print progress while building.

    Returns:
        The CNN hub.

    """
    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "hubs" / "cnn"
    return load_or_build_hub(
        out, CNN_HUB_SPECS, source="source", epochs=epochs, seed=seed, force=force, name="cnn", verbose=verbose
    )
