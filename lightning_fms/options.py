"""The tuner's options, declared once: :class:`StudyOptions`, and what is generated from it.

Each field of :class:`StudyOptions` (type, default, help) is

* a **recipe key**: the fields declared ``top_level`` are keys of the recipe itself (``budget: 100``), the
  others keys of its ``tuner:`` block (:func:`recipe_option_names`); :func:`check_option` validates a value;
* a **``lightning-fms tune`` flag** ``--<field>`` that overrides the recipe (:func:`add_option_flags`,
  :func:`flag_values`); ``lightning-fms agent`` gets the flags of the fields
  :class:`~lightning_fms.agent.AgentSettings` takes;
* a **``FMSLightningCLI`` option** ``--tuner.<field>``: :class:`TunerOptions` (the ``tuner`` group) extends
  :class:`StudyOptions` with the options only the LightningCLI has;
* a **keyword argument** of :class:`~lightning_fms.tuner.FMSTuner` (:func:`tuner_arguments`), except the fields
  declared for the executor.

So a new option is one field here (and the code that uses it). The searcher, curve-encoder and featurizer
choices come from their registries (:data:`~lightning_fms.search.searcher.SEARCHERS`,
:data:`~lightning_fms.search.searcher.CURVE_ENCODERS`, :data:`~lightning_fms.weights.registry.FEATURIZERS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import yaml

from lightning_fms.errors import FMSError
from lightning_fms.search.optimizer import DEFAULT_FRESH_CANDIDATES, DEFAULT_STARTUP_TRIALS
from lightning_fms.search.pending import DEFAULT_FANTASIES, DEFAULT_PENDING, PENDING_STRATEGIES
from lightning_fms.search.row_cap import DEFAULT_MAX_ROWS
from lightning_fms.search.searcher import AUTO_WEIGHTS, CURVE_ENCODERS, SEARCHERS
from lightning_fms.weights.registry import FEATURIZERS

__all__ = [
    "FALLBACK_MODE",
    "OPTION_GROUPS",
    "TUNERS",
    "RayOptions",
    "StudyOptions",
    "TunerOptions",
    "WandbOptions",
    "add_option_flags",
    "check_option",
    "declared_default",
    "flag_values",
    "option",
    "option_names",
    "options_dataclass",
    "recipe_option_names",
    "tuner_arguments",
]

TUNERS: tuple[str, ...] = ("fms",)
"""The values ``FMSLightningCLI``'s ``--tuner`` accepts."""
FALLBACK_MODE: Literal["max", "min"] = "max"
"""The ``mode`` of a study when neither it nor its space file gives one (FMSTuner's, a recipe's, an agent's)."""

SearcherName = Literal[SEARCHERS]  # type: ignore[valid-type]
CurveEncoderName = Literal[CURVE_ENCODERS]  # type: ignore[valid-type]
PendingName = Literal[PENDING_STRATEGIES]  # type: ignore[valid-type]
WeightsName = Literal[(AUTO_WEIGHTS, "none", *FEATURIZERS)]  # type: ignore[valid-type]
Parse = Callable[[str], Any]


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    top_level: bool = False,
    minimum: int | None = None,
    nonempty: bool = False,
    parse: Parse | None = None,
    executor: bool = False,
) -> Any:
    """A declared option: a dataclass field with its help and how the front ends treat it.

    Args:
        default: The default value.
        help: One sentence for ``--help``, the docstring and the docs.
        default_factory: For a mutable default, instead of ``default``.
        top_level: A key of the recipe itself (``budget``), not of its ``tuner:`` block.
        minimum: The smallest integer accepted (recipes and flags).
        nonempty: A string must not be empty.
        parse: Turns a flag's text into the value (default: by the field's type; see :func:`add_option_flags`).
        executor: The executor takes it, not :class:`~lightning_fms.tuner.FMSTuner` (:func:`tuner_arguments`).
    """
    metadata = {
        "help": help,
        "top_level": top_level,
        "minimum": minimum,
        "nonempty": nonempty,
        "parse": parse,
        "executor": executor,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def options_dataclass(cls: type) -> type:
    """``@dataclass``, plus an ``Args:`` section written from each field's help (``--help`` and ``help()`` read it)."""
    cls = dataclasses.dataclass(cls)
    lines = [f"        {f.name}: {f.metadata.get('help', '')}" for f in dataclasses.fields(cls)]
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Args:\n" + "\n".join(lines) + "\n"
    return cls


# ------------------------------------------------------------------------------------------------ the declaration
def _parse_mapping(text: str) -> dict[str, Any]:
    """A YAML mapping such as ``{full_fit_steps: 60, refine_steps: 10}``."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise ValueError("must be a mapping like '{steps: 50}'")
    return value


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _parse_frozen_layers(text: str) -> bool | list[float]:
    """``true``/``false`` or comma-separated trainable fractions (their range is the tuner's to check)."""
    try:
        return _parse_bool(text)
    except ValueError:
        pass
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError("must be true, false or fractions like 0.25,0.5") from None


RayMode = Literal["async", "sync"]
RayRefit = Literal["auto", "background", "inline"]


@options_dataclass
class RayOptions:
    """Where a study's epochs run on a Ray cluster (the ``ray`` extra, docs/ray.md); unset, they run in this process.

    A recipe's ``tuner.ray:`` block (even empty) runs the study on Ray; so does any ``--ray.*`` flag of
    ``lightning-fms tune`` or ``--tuner.ray.*`` option of ``FMSLightningCLI``.
    """

    address: str | None = option(
        None,
        "The Ray cluster: null starts a local single-host one (on 127.0.0.1 only); 'auto' or HOST:PORT attaches to "
        "a running one (ray start --head).",
        nonempty=True,
    )
    workers: int | None = option(None, "Epochs run at once, one long-lived Ray worker each (default 1).", minimum=1)
    cpus_per_trial: float | None = option(None, "Ray CPUs each worker holds (default 1).", minimum=0)
    gpus_per_trial: float | None = option(
        None, "Ray GPUs each worker holds; may be fractional, 0.5 packs two workers per GPU (default 0).", minimum=0
    )
    mode: RayMode | None = option(
        None,
        "How the driver decides: async (whenever a worker frees; the default) or sync (batches of one decision "
        "per worker, reproducible with the same seed).",
    )
    refit: RayRefit | None = option(
        None,
        "When async decisions refit the surrogate in a background thread and decide with the latest fit meanwhile: "
        "auto (once a fit outlasts the time between two free workers; the default), background (always), inline "
        "(never).",
    )

    @property
    def enabled(self) -> bool:
        """Whether any option is set."""
        return bool(self.given())

    def given(self) -> dict[str, Any]:
        """The options that are set (the keyword arguments of the Ray executor)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


#: Options whose value is a group of options (a declaration of its own): recipe ``tuner.<name>:`` blocks,
#: ``--<name>.<option>`` flags and ``--tuner.<name>.<option>`` with FMSLightningCLI.
OPTION_GROUPS: dict[str, type] = {"ray": RayOptions}


@options_dataclass
class StudyOptions:
    """How a study searches: its budget, metric, seed, searcher and surrogate settings."""

    budget: int = option(100, "Total epochs over all trials.", top_level=True, minimum=1)
    monitor: str | None = option(
        None,
        "Metric to optimise, as the module logs it (default: the space file's metric).",
        top_level=True,
        nonempty=True,
    )
    mode: Literal["max", "min"] | None = option(
        None,
        f"``max`` or ``min`` (default: the space file's goal; a recipe or an agent falls back to {FALLBACK_MODE}).",
        top_level=True,
    )
    max_epochs_per_trial: int = option(20, "Per-trial epoch cap (and LR-schedule horizon).", top_level=True, minimum=1)
    seed: int = option(0, "Seeds every decision and every trial (keep it when resuming).", top_level=True, minimum=0)
    searcher: SearcherName = option(
        "fms",
        f"What decides the next epoch: {', '.join(SEARCHERS)} (the default: plain-GP kernel plus curve and weight "
        "kernels; the paper's deep-kernel GP; plain GP; random search).",
    )
    weights: WeightsName = option(
        "auto",
        f"Checkpoint featurizer of the surrogate: auto (summary for the fms searcher when the space has a hub "
        f"choice, else none), none, or {', '.join(FEATURIZERS)} (reads the weights).",
    )
    weights_attribute: str | None = option(
        None,
        "Submodule whose weights the featurizer reads (default: a recipe's hub argument; with FMSLightningCLI "
        "the whole module; empty: the whole module).",
        executor=True,
    )
    curve: CurveEncoderName = option("cnn", f"Learning-curve encoder: {', '.join(CURVE_ENCODERS)}.")
    device: str | None = option(None, "Surrogate device (default: CUDA when present).")
    num_fresh_candidates: int = option(DEFAULT_FRESH_CANDIDATES, "Fresh configurations scored per decision.")
    num_startup_trials: int = option(DEFAULT_STARTUP_TRIALS, "Random configurations started before the searcher.")
    max_paused_trials: int | None = option(None, "Bound on paused trials (their checkpoints); default unbounded.")
    max_surrogate_rows: int | None = option(
        DEFAULT_MAX_ROWS,
        "Cap on the surrogate's training rows (every row of the longest trials is kept); null: no cap.",
        minimum=2,
    )
    promotion_probability: float | None = option(
        None,
        "Per decision, the probability of continuing the best paused trial of the highest rung instead of asking "
        "the surrogate (default: the searcher's own, 0.25 for fms, 0 for the paper's dyhpo and the plain gp).",
    )
    pending: PendingName = option(
        DEFAULT_PENDING,
        "How epochs running on other workers enter a decision's fit: "
        f"{', '.join(PENDING_STRATEGIES)} (see docs/ray.md).",
    )
    fantasies: int = option(DEFAULT_FANTASIES, "Posterior draws (one fit each) of pending=fantasies.", minimum=1)
    surrogate_options: dict[str, Any] | None = option(None, "Extra surrogate arguments, e.g. '{full_fit_steps: 60}'.")
    featurizer_options: dict[str, Any] | None = option(None, "Extra featurizer arguments, e.g. '{embedding_dim: 16}'.")
    frozen_layers: bool | list[float] | None = option(
        None,
        "The frozen-layer fidelity: true (trainable fractions 0.25, 0.5, 1), fractions like 0.2,0.5, or off "
        "(default); see docs/concepts.md.",
        parse=_parse_frozen_layers,
    )
    prior: str | None = option(
        None,
        "A prior file written by lightning-fms pretrain: fresh surrogate fits start from it (see docs/transfer.md).",
    )
    ray: RayOptions = option(
        default_factory=RayOptions,
        help="Run the epochs on a Ray cluster, several at once (see docs/ray.md).",
        executor=True,
    )


@options_dataclass
class WandbOptions:
    """Weights & Biases logging of the study (needs ``pip install 'lightning_fms[wandb]'``)."""

    project: str | None = option(None, "W&B project; setting any ``--tuner.wandb.*`` option turns W&B logging on.")
    entity: str | None = option(None, "W&B entity (user or team).")
    group: str | None = option(None, "Group of the study's runs (default: the study directory's name).")
    mode: Literal["online", "offline", "disabled"] | None = option(
        None, "W&B mode (default: W&B's own, e.g. ``WANDB_MODE``)."
    )
    dir: str | None = option(None, "Folder for W&B's local files (default: ``WANDB_DIR``, else the study directory).")
    tags: list[str] | None = option(None, "Tags of every run.")

    @property
    def enabled(self) -> bool:
        """Whether any option is set."""
        return any(getattr(self, f.name) is not None for f in dataclasses.fields(self))


@options_dataclass
class TunerOptions(StudyOptions):
    """Forecasting Model Search over this config (``--tuner fms``, docs/cli.md): the study's options and the CLI's."""

    name: Literal[TUNERS] | None = option(
        None, "The tuner that runs ``fit`` (``--tuner fms`` sets it); unset, ``fit`` trains once as usual."
    )
    space: str | dict[str, Any] | None = option(
        None,
        "Search space: a YAML file (a W&B sweep, or parameter name -> ``{type: float|int|categorical|hub, ...}``) "
        "or the mapping itself. Keys are config keys such as ``model.init_args.lr``.",
    )
    study_dir: str | None = option(None, "Study directory (created, or resumed when it holds a study).")
    max_epochs_key: str | None = option(
        None,
        "Config key that receives the per-trial cap (e.g. ``model.init_args.max_epochs``) so an LR schedule has a "
        "fixed horizon.",
    )
    hub_key: str | None = option(
        None,
        "Space parameter whose choices are pretrained weight files (the hub choice); a ``{type: hub}`` parameter "
        "is one already.",
    )
    preflight: bool = option(True, "Check with a one-batch fit that the monitored metric is logged, before the study.")
    progress: bool = option(True, "Show a live progress display.")
    wandb: WandbOptions = option(default_factory=WandbOptions, help="W&B logging.")


# ------------------------------------------------------------------------------------------------ reading it
@functools.cache
def _fields(declaration: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(declaration)}


@functools.cache
def _hints(declaration: type) -> dict[str, Any]:
    return typing.get_type_hints(declaration)


def option_names(declaration: type = StudyOptions) -> tuple[str, ...]:
    """Every option of a declaration, in declaration order."""
    return tuple(_fields(declaration))


def recipe_option_names(declaration: type = StudyOptions, *, top_level: bool) -> tuple[str, ...]:
    """The options that are keys of the recipe itself (``top_level=True``) or of its ``tuner:`` block."""
    return tuple(name for name, f in _fields(declaration).items() if f.metadata["top_level"] == top_level)


def declared_default(name: str, declaration: type = StudyOptions) -> Any:
    """The declared default of an option."""
    spec = _fields(declaration)[name]
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def tuner_arguments(options: StudyOptions | Mapping[str, Any], declaration: type = StudyOptions) -> dict[str, Any]:
    """The :class:`~lightning_fms.tuner.FMSTuner` keyword arguments of options (those for the executor left out).

    Args:
        options: An instance of the declaration (every field), or a mapping of given options (a recipe's).
        declaration: The declaration whose fields are the tuner's.
    """
    values = options if isinstance(options, Mapping) else {n: getattr(options, n) for n in option_names(declaration)}
    fields = _fields(declaration)
    return {name: value for name, value in values.items() if name in fields and not fields[name].metadata["executor"]}


# ------------------------------------------------------------------------------------------------ validation
def _union_args(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin is list:
        return "a list of " + {float: "numbers", int: "integers", str: "strings"}.get(
            typing.get_args(hint)[0], "values"
        )
    if origin is dict or hint is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def check_option(name: str, value: Any, declaration: type = StudyOptions, prefix: str = "") -> Any:
    """Validate one option's value (from a recipe or a flag) against its declared type and bounds.

    An option group (:data:`OPTION_GROUPS`, e.g. ``ray``) takes a mapping of its own options (each validated the
    same way; ``None``: none set) and returns the group's dataclass.

    Args:
        name: The option.
        value: Its value.
        declaration: The declaration the option belongs to.
        prefix: Put before the option's name in messages (``"ray."`` for the options of the ``ray`` group).

    Returns:
        The value (an option group's dataclass for a group).

    Raises:
        FMSError: unknown option, wrong type, a choice that does not exist, below the minimum, an empty string.
    """
    spec = _fields(declaration).get(name)
    label = prefix + name
    if spec is None:
        known = ", ".join(prefix + n for n in option_names(declaration))
        raise FMSError(f"unknown option {label!r} (known: {known})")
    hint = _hints(declaration)[name]
    group = OPTION_GROUPS.get(name)
    if group is not None and hint is group and not isinstance(value, group):
        return _check_group(label, value, group)
    if not _matches(value, hint):
        choices = [a for a in _union_args(hint) if typing.get_origin(a) is Literal]
        if choices and isinstance(value, str):
            known = ", ".join(map(str, typing.get_args(choices[0])))
            raise FMSError(f"unknown {label} {value!r} (expected one of {known})")
        raise FMSError(f"{label} must be {_describe(hint)}, got {value!r}")
    if spec.metadata["nonempty"] and value == "":
        raise FMSError(f"{label} must be a non-empty string, got {value!r}")
    minimum = spec.metadata["minimum"]
    if minimum is not None and value is not None and value < minimum:
        raise FMSError(f"{label} must be >= {minimum}, got {value}")
    return value


def _check_group(label: str, value: Any, group: type) -> Any:
    """An option group's dataclass from a mapping of its options, each validated."""
    if value is None:
        return group()
    if not isinstance(value, Mapping):
        raise FMSError(f"{label} must be a mapping of its options ({', '.join(option_names(group))}), got {value!r}")
    checked = {key: check_option(str(key), item, group, prefix=f"{label}.") for key, item in value.items()}
    return group(**checked)


# ------------------------------------------------------------------------------------------------ flags
def _flag_kind(name: str, declaration: type) -> tuple[dict[str, Any], Parse | None]:
    """``add_argument`` keywords and the text parser (``None``: argparse converts) of an option's flag."""
    spec, hint = _fields(declaration)[name], _hints(declaration)[name]
    if spec.metadata["parse"] is not None:
        return {"metavar": name.upper()}, spec.metadata["parse"]
    kinds = [a for a in _union_args(hint) if a is not type(None)]
    if len(kinds) == 1 and typing.get_origin(kinds[0]) is Literal:
        return {"choices": typing.get_args(kinds[0])}, None
    if kinds in ([int], [float], [str]):
        return {"type": kinds[0], "metavar": name.upper()}, None
    if kinds == [bool]:
        return {"metavar": "true|false"}, _parse_bool
    if len(kinds) == 1 and (typing.get_origin(kinds[0]) is dict or kinds[0] is dict):
        return {"metavar": "MAPPING"}, _parse_mapping
    return {"metavar": name.upper()}, yaml.safe_load  # anything else: a YAML value, checked by check_option


def add_option_flags(parser: argparse.ArgumentParser, names: Iterable[str], declaration: type = StudyOptions) -> None:
    """Add a flag ``--<name>`` per option, generated from the declaration; read them back with :func:`flag_values`.

    A flag's value is converted by the field's type: a ``Literal`` gives the choices, ``int``/``float``/``str``
    an argparse type, ``bool`` ``true``/``false``, a ``dict`` a YAML mapping, anything else a YAML value, and a
    field's own ``parse`` wins. Every flag defaults to ``None`` (not given).
    """
    for name in names:
        group = OPTION_GROUPS.get(name)
        if group is not None and _hints(declaration)[name] is group:  # --ray.address, --ray.workers, ...
            for sub in option_names(group):
                keywords, _ = _flag_kind(sub, group)
                text = _fields(group)[sub].metadata["help"].replace("``", "")
                parser.add_argument(f"--{name}.{sub}", dest=f"{name}.{sub}", default=None, help=text, **keywords)
            continue
        keywords, _ = _flag_kind(name, declaration)
        text = _fields(declaration)[name].metadata["help"].replace("``", "")  # the docstring's markup
        parser.add_argument(f"--{name}", default=None, help=text, **keywords)


def flag_values(
    args: argparse.Namespace, names: Iterable[str], declaration: type = StudyOptions, prefix: str = ""
) -> dict[str, Any]:
    """The options given as flags (those not ``None``), converted and validated by :func:`check_option`.

    An option group's flags (``--ray.workers 2``) give a mapping of the group's options that were given
    (``{"ray": {"workers": 2}}``), validated, for a recipe's block to be updated with. ``prefix`` is put before
    the option names in messages.

    Raises:
        FMSError: a value that does not parse or validate (the message names the flag).
    """
    out: dict[str, Any] = {}
    for name in names:
        group = OPTION_GROUPS.get(name)
        if group is not None and _hints(declaration)[name] is group:  # a mapping of the --<name>.* flags given
            flags = argparse.Namespace(**_group_flags(args, name))
            given = flag_values(flags, option_names(group), group, prefix=f"{name}.")
            if given:
                out[name] = given
            continue
        text = getattr(args, name, None)
        if text is None:
            continue
        _, parse = _flag_kind(name, declaration)
        try:
            value = parse(text) if parse is not None else text
        except (ValueError, yaml.YAMLError) as error:
            raise FMSError(f"--{prefix}{name} {error}, got {text!r}") from None
        out[name] = check_option(name, value, declaration, prefix=prefix)
    return out


def _group_flags(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The ``--<name>.<option>`` flags of an option group, by option (``None``: not given)."""
    start = f"{name}."
    return {key[len(start) :]: value for key, value in vars(args).items() if key.startswith(start)}
