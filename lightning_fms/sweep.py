"""Search-space files: W&B sweep YAML and the recipe format, read into a :class:`~lightning_fms.SearchSpace`.

A W&B user brings the sweep file unchanged::

    method: bayes                       # ignored: FMS decides what trains next
    metric: {name: val_acc, goal: maximize}
    parameters:                         # the search space
      model.init_args.lr: {distribution: log_uniform_values, min: 1.0e-4, max: 0.1}
      model.init_args.dropout: {min: 0.0, max: 0.5}
      data.batch_size: {values: [16, 32, 64]}

:func:`space_from_sweep` maps ``values`` to a categorical, ``min``/``max`` to an int range (both bounds
integers) or a float range, and the distributions in :data:`SUPPORTED_DISTRIBUTIONS`; anything else is
refused with a message that lists them. :func:`read_space_file` also reads the recipe format
(``{model.lr: {type: float, low: ..., high: ..., log: true}, ...}``, optionally wrapped as
``{space: {...}, monitor: ..., mode: ...}``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_fms.errors import FMSError, one_line
from lightning_fms.search.space import CategoricalParam, FloatParam, IntParam, Parameter, SearchSpace

__all__ = ["SUPPORTED_DISTRIBUTIONS", "SpaceFile", "read_space_file", "space_from_sweep"]

log = logging.getLogger(__name__)

SUPPORTED_DISTRIBUTIONS = ("categorical", "constant", "int_uniform", "log_uniform", "log_uniform_values", "uniform")
"""The W&B sweep distributions FMS reads (``q_*``, ``normal``, ``inv_log_uniform*``, ``beta`` are refused)."""

_SWEEP_TOP_KEYS_USED = ("parameters", "metric")
_SWEEP_TOP_KEYS_IGNORED = (
    "method",
    "program",
    "command",
    "name",
    "description",
    "project",
    "entity",
    "run_cap",
    "controller",
    "early_terminate",
    "job",
    "image_uri",
    "scheduler",
    "metrics",
)
_KEYS_BY_DISTRIBUTION = {
    "categorical": {"distribution", "values"},
    "constant": {"distribution", "value"},
    "uniform": {"distribution", "min", "max"},
    "int_uniform": {"distribution", "min", "max"},
    "log_uniform": {"distribution", "min", "max"},
    "log_uniform_values": {"distribution", "min", "max"},
}


def space_from_sweep(sweep: Mapping[str, Any]) -> tuple[SearchSpace, str | None, str | None]:
    """Read a W&B sweep configuration as a search space.

    Args:
        sweep: The sweep configuration (the parsed YAML): ``parameters`` (required), ``metric``
            (optional: ``{name, goal}``); ``method``, ``program``, ``command``, ``early_terminate`` and
            W&B's other keys are accepted and ignored.

    Returns:
        ``(space, metric, mode)``: the space, the metric's name (``None`` without ``metric``) and
        ``"max"``/``"min"`` from ``metric.goal`` (W&B's default goal is ``minimize``; ``None`` without
        ``metric``).

    Raises:
        FMSError: a malformed sweep, or a distribution FMS does not support (the message lists the supported ones).
    """
    if not isinstance(sweep, Mapping):
        raise FMSError("a W&B sweep must be a mapping with 'parameters'")
    unknown = set(sweep) - set(_SWEEP_TOP_KEYS_USED) - set(_SWEEP_TOP_KEYS_IGNORED)
    if unknown:
        raise FMSError(f"unknown sweep key(s) {sorted(map(str, unknown))}")
    if "early_terminate" in sweep:
        log.warning("the sweep's early_terminate is ignored: FMS pauses and resumes trials itself")
    parameters = sweep.get("parameters")
    if not isinstance(parameters, Mapping) or not parameters:
        raise FMSError("the sweep needs 'parameters': a mapping of parameter name to its values or distribution")
    flat: dict[str, Parameter] = {}
    _read_parameters(parameters, "", flat)
    space = SearchSpace(flat)
    metric, mode = _read_metric(sweep.get("metric"))
    return space, metric, mode


def _read_parameters(parameters: Mapping[str, Any], prefix: str, out: dict[str, Parameter]) -> None:
    for raw_name, spec in parameters.items():
        name = f"{prefix}{raw_name}"
        if isinstance(spec, Mapping) and "parameters" in spec:
            if set(spec) != {"parameters"} or not isinstance(spec["parameters"], Mapping):
                raise FMSError(f"sweep parameter {name!r}: nested 'parameters' must be the only key and a mapping")
            _read_parameters(spec["parameters"], f"{name}.", out)
        else:
            out[name] = _sweep_parameter(name, spec)


def _sweep_parameter(name: str, spec: Any) -> Parameter:
    supported = ", ".join(SUPPORTED_DISTRIBUTIONS)
    if not isinstance(spec, Mapping):
        raise FMSError(f"sweep parameter {name!r}: expected a mapping with 'values', 'value' or 'min'/'max'")
    distribution = spec.get("distribution")
    if distribution is None:
        if "values" in spec:
            distribution = "categorical"
        elif "value" in spec:
            distribution = "constant"
        elif "min" in spec and "max" in spec:
            both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
            distribution = "int_uniform" if both_int else "uniform"
        else:
            raise FMSError(f"sweep parameter {name!r}: give 'values', 'value', or 'min' and 'max'")
    if distribution not in _KEYS_BY_DISTRIBUTION:
        raise FMSError(
            f"sweep parameter {name!r}: distribution {distribution!r} is not supported (supported: {supported})"
        )
    extra = set(spec) - _KEYS_BY_DISTRIBUTION[distribution]
    if extra:
        raise FMSError(
            f"sweep parameter {name!r}: key(s) {sorted(map(str, extra))} are not supported with "
            f"distribution {distribution!r} (supported distributions: {supported})"
        )
    missing = sorted(_KEYS_BY_DISTRIBUTION[distribution] - {"distribution"} - set(spec))
    if missing:
        raise FMSError(f"sweep parameter {name!r}: distribution {distribution!r} needs {missing}")
    try:
        if distribution == "categorical":
            values = spec["values"]
            if not isinstance(values, list) or not values:
                raise FMSError("'values' must be a non-empty list")
            return CategoricalParam(tuple(values))
        if distribution == "constant":
            return CategoricalParam((spec["value"],))
        low, high = _number(spec["min"], "min"), _number(spec["max"], "max")
        if distribution == "int_uniform":
            if not (float(low).is_integer() and float(high).is_integer()):
                raise FMSError(f"int_uniform needs integer bounds, got min={low}, max={high}")
            return IntParam(int(low), int(high))
        if distribution == "uniform":
            return FloatParam(float(low), float(high))
        if distribution == "log_uniform_values":
            return FloatParam(float(low), float(high), log=True)
        # log_uniform: W&B's bounds are natural-log exponents
        return FloatParam(math.exp(low), math.exp(high), log=True)
    except FMSError as error:
        raise FMSError(f"sweep parameter {name!r}: {error}") from None


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FMSError(f"'{key}' must be a number, got {value!r}")
    return value


def _read_metric(metric: Any) -> tuple[str | None, str | None]:
    if metric is None:
        return None, None
    if not isinstance(metric, Mapping) or not isinstance(metric.get("name"), str) or not metric["name"]:
        raise FMSError("the sweep's 'metric' must be a mapping with a 'name' (and a 'goal')")
    goal = metric.get("goal", "minimize")
    if goal not in ("maximize", "minimize"):
        raise FMSError(f"the sweep's metric.goal must be 'maximize' or 'minimize', got {goal!r}")
    return metric["name"], "max" if goal == "maximize" else "min"


@dataclass
class SpaceFile:
    """A search space as read from a file (or a mapping).

    Attributes:
        space: The search space; a ``{type: hub}`` parameter is a :class:`~lightning_fms.search.space.HubChoice`
            whose choices are written as in the file (not resolved).
        monitor: The metric named by the file (``metric.name`` of a sweep, ``monitor`` of the recipe
            form), or ``None``.
        mode: ``"max"``/``"min"`` named by the file, or ``None``.
        kind: ``"sweep"`` or ``"recipe"``.
        base_dir: The file's folder (relative paths in the file are taken from there), or ``None``.
    """

    space: SearchSpace
    monitor: str | None
    mode: str | None
    kind: str
    base_dir: Path | None


def read_space_file(
    source: str | os.PathLike[str] | Mapping[str, Any], hub_entries: Sequence[str] | None = None
) -> SpaceFile:
    """Read a search space in any of the accepted forms.

    * a W&B sweep (a mapping with ``parameters``), see :func:`space_from_sweep`;
    * the recipe form ``{space: {name: spec}, monitor: ..., mode: ...}`` (``monitor``/``mode`` optional);
    * a bare mapping ``{name: spec}`` with specs like ``{type: float, low: ..., high: ..., log: true}``.

    Args:
        source: A YAML file, or the parsed mapping itself.
        hub_entries: The model hub's entry names: a ``{type: hub}`` choice without ``choices`` takes them, and
            one with ``choices`` must name entries of the hub (``None``: no hub; a hub choice lists its choices).

    Raises:
        FMSError: the file is missing or not YAML, or the space is invalid.
    """
    base_dir = None
    if isinstance(source, Mapping):
        data: Any = source
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FMSError(f"space file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise FMSError(f"space file {path} is not valid YAML: {one_line(error)}") from None
        base_dir = path.resolve().parent
    if not isinstance(data, Mapping) or not data:
        raise FMSError("a space file must be a mapping (a W&B sweep, or parameter name -> spec)")
    if "parameters" in data:
        space, monitor, mode = space_from_sweep(data)
        return SpaceFile(space, monitor, mode, "sweep", base_dir)
    monitor = mode = None
    specs = data
    if "space" in data:
        unknown = set(data) - {"space", "monitor", "mode"}
        if unknown:
            raise FMSError(f"space file: unknown key(s) {sorted(map(str, unknown))} (expected space, monitor, mode)")
        specs, monitor, mode = data["space"], data.get("monitor"), data.get("mode")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise FMSError(f"space file: monitor must be a metric name, got {monitor!r}")
        if mode is not None and mode not in ("max", "min"):
            raise FMSError(f"space file: mode must be 'max' or 'min', got {mode!r}")
    return SpaceFile(SearchSpace.from_dict(specs, hub_entries=hub_entries), monitor, mode, "recipe", base_dir)
