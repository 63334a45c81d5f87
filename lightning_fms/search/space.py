"""Search spaces: typed parameters, validation, unit-cube encoding and seeded sampling.

A space is an ordered mapping from parameter names to parameters. Names are dotted targets:
``model.lr`` is passed to the LightningModule as ``lr``, ``data.batch_size`` to the DataModule as
``batch_size``; a name without a dot goes to the module. The hub choice (:class:`HubChoice`) picks
which pretrained entry of the model hub a trial starts from.

Example::

    space = SearchSpace.from_dict({
        "hub": {"type": "hub"},
        "model.lr": {"type": "float", "low": 1e-4, "high": 0.3, "log": True},
        "data.batch_size": {"type": "categorical", "choices": [16, 32, 64]},
    }, hub_entries=["mlp-s", "cnn-s"])
    config = space.sample(numpy.random.default_rng(0))
    x = space.encode(config)  # shape [space.dim], in [0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_fms.errors import FMSError

Config = dict[str, Any]


@dataclass(frozen=True)
class FloatParam:
    """A real number in ``[low, high]``, sampled and encoded on a log scale when ``log`` is set."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise FMSError(f"range [{self.low}, {self.high}] must be finite")
        if self.low > self.high:
            raise FMSError(f"range low={self.low} is above high={self.high}")
        if self.log and self.low <= 0:
            raise FMSError(f"log scale needs low > 0, got low={self.low}")

    @property
    def dim(self) -> int:
        """Width of this parameter's encoding."""
        return 1

    def _to_unit(self, value: float) -> float:
        lo, hi, v = (
            (math.log(self.low), math.log(self.high), math.log(value))
            if self.log
            else (
                self.low,
                self.high,
                value,
            )
        )
        return 0.5 if hi == lo else (v - lo) / (hi - lo)

    def encode(self, value: Any) -> list[float]:
        """Map ``value`` to ``[0, 1]`` (log first where declared)."""
        return [self._to_unit(float(value))]

    def sample(self, rng: np.random.Generator) -> float:
        """Draw uniformly (log-uniformly where declared)."""
        u = float(rng.random())
        if self.log:
            return float(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))
        return float(self.low + u * (self.high - self.low))

    def validate(self, value: Any, name: str) -> None:
        """Raise :class:`FMSError` if ``value`` is not a number in range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FMSError(f"parameter {name!r}: {value!r} is not a number")
        if not self.low <= float(value) <= self.high:
            raise FMSError(f"parameter {name!r}: {value} is outside [{self.low}, {self.high}]")


@dataclass(frozen=True)
class IntParam:
    """An integer in ``[low, high]`` (both included), log scale optional."""

    low: int
    high: int
    log: bool = False

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise FMSError(f"range low={self.low} is above high={self.high}")
        if self.log and self.low <= 0:
            raise FMSError(f"log scale needs low > 0, got low={self.low}")

    @property
    def dim(self) -> int:
        """Width of this parameter's encoding."""
        return 1

    def encode(self, value: Any) -> list[float]:
        """Map ``value`` to ``[0, 1]``."""
        return FloatParam(self.low, self.high, self.log).encode(value)

    def sample(self, rng: np.random.Generator) -> int:
        """Draw uniformly over the integers (log-uniformly where declared)."""
        if not self.log:
            return int(rng.integers(self.low, self.high + 1))
        u = float(rng.random())
        lo, hi = math.log(self.low - 0.5 if self.low > 0.5 else self.low), math.log(self.high + 0.5)
        return int(min(self.high, max(self.low, round(math.exp(lo + u * (hi - lo))))))

    def validate(self, value: Any, name: str) -> None:
        """Raise :class:`FMSError` if ``value`` is not an integer in range."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise FMSError(f"parameter {name!r}: {value!r} is not an integer")
        if not self.low <= value <= self.high:
            raise FMSError(f"parameter {name!r}: {value} is outside [{self.low}, {self.high}]")


@dataclass(frozen=True)
class CategoricalParam:
    """One of a fixed list of choices, one-hot encoded."""

    choices: tuple[Any, ...]

    def __post_init__(self) -> None:
        if len(self.choices) == 0:
            raise FMSError("a categorical parameter needs at least one choice")
        if len(set(map(repr, self.choices))) != len(self.choices):
            raise FMSError(f"categorical choices repeat: {list(self.choices)}")

    @property
    def dim(self) -> int:
        """Width of this parameter's encoding (one-hot)."""
        return len(self.choices)

    def index(self, value: Any) -> int:
        """Position of ``value`` among the choices."""
        for i, choice in enumerate(self.choices):
            if choice == value and type(choice) is type(value):
                return i
        for i, choice in enumerate(self.choices):
            if choice == value:
                return i
        raise ValueError(value)

    def encode(self, value: Any) -> list[float]:
        """One-hot vector of length ``dim``."""
        one_hot = [0.0] * len(self.choices)
        one_hot[self.index(value)] = 1.0
        return one_hot

    def sample(self, rng: np.random.Generator) -> Any:
        """Draw a choice uniformly."""
        return self.choices[int(rng.integers(len(self.choices)))]

    def validate(self, value: Any, name: str) -> None:
        """Raise :class:`FMSError` if ``value`` is not one of the choices."""
        try:
            self.index(value)
        except ValueError:
            raise FMSError(f"parameter {name!r}: {value!r} is not one of {list(self.choices)}") from None


@dataclass(frozen=True)
class HubChoice(CategoricalParam):
    """The model-hub entry a trial starts from: a categorical over hub entry names."""


Parameter = FloatParam | IntParam | CategoricalParam

_TYPES = ("float", "int", "categorical", "hub")


def parameter_from_dict(name: str, spec: Any, hub_entries: Sequence[str] | None = None) -> Parameter:
    """Build one parameter from its recipe form, e.g. ``{"type": "float", "low": 1e-4, "high": 1, "log": True}``.

    Raises:
        FMSError: the spec is malformed (unknown type or key, missing bound, impossible range).
    """
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise FMSError(f"parameter {name!r}: expected a mapping with a 'type' (one of {', '.join(_TYPES)})")
    kind = spec["type"]
    allowed = {
        "float": {"type", "low", "high", "log"},
        "int": {"type", "low", "high", "log"},
        "categorical": {"type", "choices"},
        "hub": {"type", "choices"},
    }
    if kind not in allowed:
        raise FMSError(f"parameter {name!r}: unknown type {kind!r} (expected one of {', '.join(_TYPES)})")
    unknown = set(spec) - allowed[kind]
    if unknown:
        raise FMSError(f"parameter {name!r}: unknown key(s) {sorted(unknown)} for type {kind!r}")
    try:
        if kind in ("float", "int"):
            if "low" not in spec or "high" not in spec:
                raise FMSError(f"parameter {name!r}: type {kind!r} needs 'low' and 'high'")
            cast = float if kind == "float" else _strict_int
            low, high = cast(spec["low"]), cast(spec["high"])
            param_cls = FloatParam if kind == "float" else IntParam
            return param_cls(low, high, bool(spec.get("log", False)))
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list):
                raise FMSError(f"parameter {name!r}: 'choices' must be a list")
            return CategoricalParam(tuple(choices))
        choices = spec.get("choices", list(hub_entries) if hub_entries is not None else None)
        if choices is None:
            raise FMSError(f"parameter {name!r}: a hub choice needs a model hub or a 'choices' list")
        if hub_entries is not None:
            missing = [c for c in choices if c not in hub_entries]
            if missing:
                raise FMSError(f"parameter {name!r}: unknown hub entry {missing[0]!r} (hub has {list(hub_entries)})")
        return HubChoice(tuple(choices))
    except FMSError as error:
        message = str(error)
        raise FMSError(message if message.startswith("parameter") else f"parameter {name!r}: {message}") from None
    except (TypeError, ValueError) as error:
        raise FMSError(f"parameter {name!r}: {error}") from None


def _strict_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise FMSError(f"{value!r} is not an integer")
    return int(value)


class SearchSpace(Mapping[str, Parameter]):
    """An ordered set of named parameters.

    Args:
        parameters: Name → parameter, in encoding order. At most one :class:`HubChoice`.
    """

    def __init__(self, parameters: Mapping[str, Parameter]) -> None:
        if not parameters:
            raise FMSError("the search space is empty")
        hubs = [n for n, p in parameters.items() if isinstance(p, HubChoice)]
        if len(hubs) > 1:
            raise FMSError(f"the search space has more than one hub choice: {hubs}")
        for name in parameters:
            if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
                raise FMSError(f"bad parameter name {name!r}")
        self._parameters = dict(parameters)
        self.hub_key: str | None = hubs[0] if hubs else None

    @classmethod
    def from_dict(cls, spec: Any, hub_entries: Sequence[str] | None = None) -> SearchSpace:
        """Build a space from its recipe form (a mapping of name → parameter spec)."""
        if not isinstance(spec, Mapping):
            raise FMSError("'space' must be a mapping of parameter name to parameter spec")
        return cls({str(n): parameter_from_dict(str(n), s, hub_entries) for n, s in spec.items()})

    def __getitem__(self, name: str) -> Parameter:
        return self._parameters[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parameters)

    def __len__(self) -> int:
        return len(self._parameters)

    @property
    def dim(self) -> int:
        """Width of :meth:`encode`'s output."""
        return sum(p.dim for p in self._parameters.values())

    def sample(self, rng: np.random.Generator) -> Config:
        """Draw a configuration, reproducibly from ``rng``."""
        return {name: param.sample(rng) for name, param in self._parameters.items()}

    def validate(self, config: Mapping[str, Any]) -> None:
        """Raise :class:`FMSError` if ``config`` misses, adds or breaks a parameter."""
        missing = [n for n in self._parameters if n not in config]
        extra = [n for n in config if n not in self._parameters]
        if missing or extra:
            raise FMSError(f"configuration does not match the space (missing {missing}, unexpected {extra})")
        for name, param in self._parameters.items():
            param.validate(config[name], name)

    def encode(self, config: Mapping[str, Any]) -> torch.Tensor:
        """Encode a configuration to the unit cube.

        Returns:
            Tensor of shape ``[dim]`` with entries in ``[0, 1]``; floats and ints min-max scaled
            (after ``log`` where declared), categoricals and the hub choice one-hot.
        """
        values: list[float] = []
        for name, param in self._parameters.items():
            values.extend(param.encode(config[name]))
        return torch.tensor(values, dtype=torch.float64)

    def encode_many(self, configs: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """Encode ``N`` configurations; shape ``[N, dim]``."""
        if not configs:
            return torch.zeros(0, self.dim, dtype=torch.float64)
        return torch.stack([self.encode(c) for c in configs])

    def split(self, config: Mapping[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Split a configuration into (hub entry, module kwargs, datamodule kwargs) by name prefix."""
        hub_entry = config.get(self.hub_key) if self.hub_key else None
        model: dict[str, Any] = {}
        data: dict[str, Any] = {}
        for name, value in config.items():
            if name == self.hub_key:
                continue
            target, _, key = name.partition(".")
            if not key:
                model[name] = value
            elif target == "data":
                data[key] = value
            elif target == "model":
                model[key] = value
            else:
                raise FMSError(f"parameter {name!r}: prefix must be 'model.' or 'data.'")
        return hub_entry, model, data

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The recipe form of this space (inverse of :meth:`from_dict`)."""
        out: dict[str, dict[str, Any]] = {}
        for name, p in self._parameters.items():
            if isinstance(p, HubChoice):
                out[name] = {"type": "hub", "choices": list(p.choices)}
            elif isinstance(p, CategoricalParam):
                out[name] = {"type": "categorical", "choices": list(p.choices)}
            else:
                kind = "float" if isinstance(p, FloatParam) else "int"
                out[name] = {"type": kind, "low": p.low, "high": p.high, "log": p.log}
        return out
