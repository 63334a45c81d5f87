"""The benchmark's generalisation protocol: leave one task out, pretrain on the others, tune the held-out one.

For every held-out task and every prior kind a method needs (``fms``: the library's surrogate with weights;
``dyhpo``: the paper's deep kernel, meta-trained without weights), :func:`leave_one_out_prior` pretrains a prior
on the other tasks' pools only (:func:`~lightning_fms.transfer.pretrain.pretrain`) and caches it under
``OUT/priors``. The held-out task's pool folder is never given to the pretraining: the prior's metadata lists the
fingerprints of exactly the pools it read, and a test removes the held-out pool before pretraining.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_fms.errors import FMSError

#: Prior kind -> the pretraining options that differ from the defaults.
PRIOR_KINDS: dict[str, dict[str, Any]] = {
    "fms": {"searcher": "fms", "weights": "auto"},
    "fms-noweights": {"searcher": "fms", "weights": "none"},
    "dyhpo": {"searcher": "dyhpo", "weights": "none"},
}


def prior_key(kind: str, held_out: str, source_fingerprints: Sequence[str], options: dict[str, Any]) -> str:
    """A short hash of what a leave-one-out prior depends on (its cache name)."""
    payload = json.dumps(
        {"kind": kind, "held_out": held_out, "sources": sorted(source_fingerprints), "options": options},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def leave_one_out_prior(
    kind: str,
    held_out: str,
    sources: dict[str, str],
    fingerprints: dict[str, str],
    out_dir: str | os.PathLike[str],
    *,
    cache_dir: str | None = None,
    say: Callable[[str], Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """The prior of ``kind`` for tuning ``held_out``, pretrained on every other task's pool (cached).

    Args:
        kind: A key of :data:`PRIOR_KINDS`.
        held_out: The held-out task's name.
        sources: Task name -> what pretraining reads for it (its task file, else its pool folder), for every task
            of the benchmark; the held-out one is skipped.
        fingerprints: Task name -> its pool's fingerprint (part of the prior's cache key).
        out_dir: The benchmark's output directory; priors go to ``out_dir/priors``.
        cache_dir: Where the pools' weight features are cached.
        say: Called with one line when a prior is pretrained.
        overrides: Further pretraining options (e.g. fewer steps in tests).

    Raises:
        FMSError: an unknown kind, or no other task to learn from.
    """
    from lightning_fms.transfer.pretrain import PretrainOptions, pretrain
    from lightning_fms.transfer.prior import load_prior

    if kind not in PRIOR_KINDS:
        raise FMSError(f"unknown prior kind {kind!r} (known: {', '.join(PRIOR_KINDS)})")
    names = [name for name in sorted(sources) if name != held_out]
    if not names:
        raise FMSError(
            f"leaving out {held_out!r} leaves no task to pretrain on: a prior method needs two tasks or more"
        )
    options = {**PRIOR_KINDS[kind], **(overrides or {}), "cache_dir": cache_dir}
    key = prior_key(kind, held_out, [fingerprints[n] for n in names], options)
    path = Path(out_dir) / "priors" / f"{kind}-without-{held_out}-{key}.safetensors"
    if path.is_file():
        try:
            load_prior(path)
            return path
        except FMSError:
            pass  # unreadable: pretrain again
    path.parent.mkdir(parents=True, exist_ok=True)
    result = pretrain([sources[n] for n in names], path, PretrainOptions(**options), progress=False)
    if say is not None:
        say(
            f"bench: pretrained the {kind} prior without {held_out} on {len(names)} pools in {result.seconds:.0f}s "
            f"({result.bytes / 1024:.0f} KiB)"
        )
    return path


__all__ = ["PRIOR_KINDS", "leave_one_out_prior", "prior_key"]
