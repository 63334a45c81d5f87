"""``lightning-fms pretrain --from SOURCE ... --out PRIOR``: learn a prior from earlier tasks (interface first).

Sources are benchmark task files (their pools are read from the cache), pool folders and finished study
directories (:mod:`~lightning_fms.transfer.sources`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_fms.options import option, options_dataclass


@options_dataclass
class PretrainOptions:
    """How a prior is learned (every field is a ``lightning-fms pretrain`` flag)."""

    searcher: Literal["fms", "dyhpo"] = option("fms", "Surrogate the prior is for: fms (the default) or dyhpo.")
    weights: str = option(
        "auto", "Featurizer of the prior: auto (summary for fms on a hub, none for dyhpo), none or summary."
    )
    curve: Literal["cnn", "none"] = option("cnn", "Learning-curve input of the surrogate: cnn or none.")
    steps: int = option(1000, "Meta-training steps (one source task and one batch of rows per step).", minimum=1)
    batch_rows: int = option(256, "Rows per meta-training step.", minimum=2)
    trunk_steps: int = option(1500, "Steps of the weight trunk's look-ahead pretraining (0: no trunk).", minimum=0)
    validation_task: str | None = option(
        None, "Source task held out to choose the checkpoint (default: the last source given)."
    )
    seed: int = option(0, "Seeds the sampling of tasks and rows and every initialisation.", minimum=0)
    cache_dir: str | None = option(None, "Where pools and computed weight features are cached.")


@dataclass
class PretrainResult:
    """What :func:`pretrain` wrote.

    Attributes:
        path: The prior file.
        bytes: Its size.
        seconds: Wall time of the whole run.
        sources: ``{name, origin, fingerprint, rows}`` per source read.
        validation: What the checkpoint choice measured on the validation task.
    """

    path: Path
    bytes: int
    seconds: float
    sources: list[dict[str, Any]] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)


def pretrain(
    sources: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    options: PretrainOptions | None = None,
    *,
    progress: bool = True,
) -> PretrainResult:
    """Learn a prior from ``sources`` and write it to ``out``.

    Raises:
        FMSError: a source that cannot be read, or options that do not fit the sources.
    """
    raise NotImplementedError("pretraining is not built yet")


__all__ = ["PretrainOptions", "PretrainResult", "pretrain"]
