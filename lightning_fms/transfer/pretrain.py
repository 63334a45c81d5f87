"""``lightning-fms pretrain --from SOURCE ... --out PRIOR``: learn a prior from earlier tasks.

Sources are benchmark task files (their pools are read from the cache), pool folders and finished study
directories (:mod:`~lightning_fms.transfer.sources`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_fms.errors import FMSError
from lightning_fms.options import option, options_dataclass
from lightning_fms.surrogate._base import SurrogateRows
from lightning_fms.threads import torch_threads
from lightning_fms.transfer.apply import SURROGATE_PREFIX, TRUNK_PREFIX
from lightning_fms.transfer.lookahead import PretrainedFeaturizer, lookahead_task, pretrain_trunk
from lightning_fms.transfer.meta_train import MetaTask, SurrogateFactory, meta_train
from lightning_fms.transfer.prior import PRIOR_FORMAT, Prior, save_prior
from lightning_fms.transfer.sources import SourceTask, read_sources, task_rows

#: Featurizers a prior can be pretrained for (the trunk reads their fixed output).
PRETRAINABLE_WEIGHTS: tuple[str, ...] = ("none", "summary")


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
    fit_steps: int | None = option(
        None,
        "Adam steps of a study's fresh surrogate fit from the prior (default: the surrogate's own full-fit steps; "
        "0: use the prior's parameters as they are, conditioning on the study's rows only).",
        minimum=0,
    )
    seed: int = option(0, "Seeds the sampling of tasks and rows and every initialisation.", minimum=0)
    threads: int | None = option(
        1,
        "torch threads while training (the models are small: on a 2-core machine one thread was several times "
        "faster than two whenever another process competed for the cores); null: torch's setting.",
        minimum=1,
    )
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


def _resolve_weights(options: PretrainOptions, sources: Sequence[SourceTask]) -> str:
    weights = options.weights
    if weights == "auto":
        hub = all(source.space.hub_key is not None for source in sources)
        weights = "summary" if options.searcher == "fms" and hub else "none"
    if weights not in PRETRAINABLE_WEIGHTS:
        raise FMSError(
            f"pretrain supports weights {', '.join(PRETRAINABLE_WEIGHTS)} (or auto), not {weights!r}: a trained "
            "graph metanetwork trunk is not pretrained here"
        )
    if weights != "none" and options.searcher != "fms":
        raise FMSError(f"a prior with weights={weights!r} is for the fms searcher, not {options.searcher!r}")
    return weights


def _shared_space(sources: Sequence[SourceTask]) -> tuple[dict[str, Any], str | None]:
    """The sources' common non-hub space (recipe form) and hub key; one line naming the first difference."""
    first = sources[0]

    def non_hub(source: SourceTask) -> dict[str, Any]:
        return {k: v for k, v in source.space.to_dict().items() if k != source.space.hub_key}

    reference = non_hub(first)
    for source in sources[1:]:
        other = non_hub(source)
        if other != reference:
            missing = sorted(set(reference) - set(other))
            extra = sorted(set(other) - set(reference))
            differing = sorted(k for k in set(reference) & set(other) if reference[k] != other[k])
            raise FMSError(
                f"source {source.name!r} has another search space than {first.name!r} (missing {missing}, extra "
                f"{extra}, different {differing}): a prior is learned over one space (hub entries may differ)"
            )
        if source.space.hub_key != first.space.hub_key:
            raise FMSError(
                f"source {source.name!r} names its hub choice {source.space.hub_key!r}, {first.name!r} names it "
                f"{first.space.hub_key!r}"
            )
    return reference, first.space.hub_key


def _surrogate_factory(options: PretrainOptions, cap: int, featurizer: Any) -> SurrogateFactory:
    from lightning_fms.surrogate import build_surrogate

    def make(x_dim: int) -> Any:
        return build_surrogate(
            options.searcher,
            x_dim=x_dim,
            curve_length=cap,
            featurizer=featurizer,
            use_curve=options.curve == "cnn",
            device="cpu",
        )

    return make


class _Progress:
    """A rich progress bar over the whole run (both phases), or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._task: Any = None
        self.total = total

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]pretrain"),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("reading sources", total=self.total)
        return self

    def phase(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def step(self, _step: int = 0, record: dict[str, float] | None = None) -> None:
        if self._bar is not None:
            text = None
            if record:
                text = ", ".join(f"{k} {v:.3f}" for k, v in record.items() if isinstance(v, float))
            self._bar.update(self._task, advance=1, **({"description": text} if text else {}))

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def pretrain(
    sources: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    options: PretrainOptions | None = None,
    *,
    progress: bool = True,
) -> PretrainResult:
    """Learn a prior from ``sources`` and write it to ``out``.

    Steps: read every source (:func:`~lightning_fms.transfer.sources.read_sources`); with weights, pretrain a
    weight trunk on look-ahead targets (:func:`~lightning_fms.transfer.lookahead.pretrain_trunk`); meta-train the
    surrogate's parameters by marginal likelihood over the sources (:func:`~lightning_fms.transfer.meta_train.
    meta_train`), reading the weights through the trunk; both choose their checkpoint on the validation source,
    which is never trained on. Then write one safetensors file with JSON metadata.

    Raises:
        FMSError: a source that cannot be read, sources with different spaces, or options that do not fit.
    """
    options = options or PretrainOptions()
    start = time.perf_counter()
    paths = [str(p) for p in sources]
    if not paths:
        raise FMSError("pretrain needs at least one source (--from)")
    out_path = Path(out)
    if out_path.exists() and out_path.is_dir():
        raise FMSError(f"--out {out_path} is a directory; give the prior's file name (e.g. prior.safetensors)")
    want_weights = options.searcher == "fms" and options.weights != "none"
    tasks_read = read_sources(paths, cache_dir=options.cache_dir, weights=want_weights)
    weights = _resolve_weights(options, tasks_read)
    space, hub_key = _shared_space(tasks_read)
    names = [t.name for t in tasks_read]
    validation_name = (
        options.validation_task if options.validation_task is not None else (names[-1] if len(names) > 1 else None)
    )
    if validation_name is not None and validation_name not in names:
        raise FMSError(f"validation_task {validation_name!r} is not a source (sources: {', '.join(names)})")
    rows = {t.name: task_rows(t) for t in tasks_read}
    for name, r in rows.items():
        if len(r.targets) < 2:
            raise FMSError(f"source {name!r} has {len(r.targets)} observed epochs; at least 2 are needed")
        if weights != "none" and r.weights is None:
            raise FMSError(f"source {name!r} has no weight features (weights={weights!r} needs them)")
    cap = max(t.cap for t in tasks_read)
    training = [n for n in names if n != validation_name] or names
    trunk_steps = options.trunk_steps if weights != "none" else 0
    total = trunk_steps + options.steps
    with _Progress(progress, total) as bar, torch_threads(options.threads):
        trunk_result = None
        features: dict[str, Tensor | None] = {n: (rows[n].weights if weights != "none" else None) for n in names}
        if trunk_steps > 0:
            bar.phase("weight trunk")
            looks = {
                n: lookahead_task(
                    n, rows[n].weights, rows[n].budget, rows[n].curves, rows[n].curve_lengths, rows[n].final
                )
                for n in names
            }
            trunk_result = pretrain_trunk(
                [looks[n] for n in training],
                looks[validation_name] if validation_name is not None else None,
                steps=trunk_steps,
                seed=options.seed,
                progress=bar.step,
            )
            with torch.no_grad():
                features = {n: trunk_result.trunk(rows[n].weights) for n in names}
        featurizer: Any = None
        if weights != "none":
            from lightning_fms.weights import build_featurizer

            featurizer = build_featurizer(weights)
            if trunk_result is not None:
                featurizer = PretrainedFeaturizer(featurizer, trunk_result.trunk)
        meta_tasks = {
            n: MetaTask(
                n,
                SurrogateRows(
                    x=rows[n].x, budget=rows[n].budget, curves=rows[n].curves, curve_lengths=rows[n].curve_lengths
                ),
                rows[n].targets,
                list(rows[n].column_names),
                f"{hub_key}=" if hub_key is not None else None,
                features[n],
            )
            for n in names
        }
        bar.phase("surrogate")
        meta = meta_train(
            _surrogate_factory(options, cap, featurizer),
            [meta_tasks[n] for n in training],
            meta_tasks[validation_name] if validation_name is not None else None,
            steps=options.steps,
            batch_rows=options.batch_rows,
            seed=options.seed,
            progress=bar.step,
        )
    tensors = {f"{SURROGATE_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in meta.parameters.items()}
    trunk_meta = None
    if trunk_result is not None:
        trunk = trunk_result.trunk
        tensors.update({f"{TRUNK_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in trunk.state_dict().items()})
        trunk_meta = {"input_dim": trunk.input_dim, "embedding_dim": trunk.embedding_dim, "hidden": trunk.hidden}
    source_records = [
        {"name": t.name, "origin": t.origin, "fingerprint": t.fingerprint, "rows": len(rows[t.name].targets)}
        for t in tasks_read
    ]
    columns = sorted({c for r in rows.values() for c in r.column_names})
    metadata = {
        "format": PRIOR_FORMAT,
        "searcher": options.searcher,
        "weights": weights,
        "curve": options.curve,
        "frozen_layers": False,
        "space": space,
        "hub_key": hub_key,
        "columns": columns,
        "sources": source_records,
        "trunk": trunk_meta,
        "fit_steps": options.fit_steps,
        "training": {
            "options": dataclasses.asdict(options),
            "validation_task": validation_name,
            "training_tasks": training,
            "surrogate": meta.summary(),
            "trunk": None if trunk_result is None else trunk_result.summary(),
            "library_version": _version(),
        },
    }
    path = save_prior(Prior(tensors=tensors, metadata=_json_safe(metadata)), out_path)
    return PretrainResult(
        path=path,
        bytes=path.stat().st_size,
        seconds=time.perf_counter() - start,
        sources=source_records,
        validation={
            "task": validation_name,
            "surrogate_nll": [meta.initial_validation_nll, meta.best_validation_nll],
            "trunk_mse": None
            if trunk_result is None
            else [trunk_result.validation_mse_without_weights, trunk_result.best_validation_mse],
        },
    )


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lightning_fms")
    except Exception:  # noqa: BLE001 (not installed as a distribution)
        return "unknown"


__all__ = ["PRETRAINABLE_WEIGHTS", "PretrainOptions", "PretrainResult", "pretrain"]
