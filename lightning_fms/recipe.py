"""Recipes: a study described in one YAML file, validated before anything trains.

Example (``recipes/demo.yaml``)::

    hub: "{cache}/hubs/demo/hub.yaml"
    hub_builder: lightning_fms.zoo.build_demo_hub      # optional: builds the hub if the file is missing
    model: {class_path: lightning_fms.zoo.ImageClassifier, init_args: {reset_head: true}}
    data: {class_path: lightning_fms.zoo.DigitsDataModule, init_args: {task: target}}
    space:
      hub: {type: hub}
      model.lr: {type: float, low: 1.0e-3, high: 0.3, log: true}
      data.batch_size: {type: categorical, choices: [16, 32, 64]}
    monitor: val_acc
    mode: max
    budget: 100
    max_epochs_per_trial: 20
    seed: 0
    tuner: {searcher: fms, weights: auto, curve: cnn}
    trainer: {accelerator: cpu}

The study's options (``monitor``, ``mode``, ``budget``, ``max_epochs_per_trial``, ``seed`` at the top, the
rest in the ``tuner:`` block) are those declared by :class:`~lightning_fms.options.StudyOptions`, validated
against their declared types. A ``tuner.ray: {address, workers, cpus_per_trial, gpus_per_trial, mode}`` block
(even empty) runs the epochs on a Ray cluster (docs/ray.md). Paths are expanded (``{cache}`` is
``$LIGHTNING_FMS_CACHE`` or ``~/.cache/lightning_fms``, then ``~`` and ``$VARS``) and, when relative, taken from
the recipe's folder
(``hub`` and ``tuner.prior``; a ``--prior`` flag's relative path is taken from the current directory).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_fms.errors import FMSError
from lightning_fms.hub import ModelHub
from lightning_fms.options import (
    FALLBACK_MODE,
    OPTION_GROUPS,
    check_option,
    declared_default,
    recipe_option_names,
    tuner_arguments,
)
from lightning_fms.parallel.ray_executor import RayExecutor, ray_settings
from lightning_fms.search.space import SearchSpace
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.training.trial_builder import DEFAULT_EPOCHS_ARGUMENT, DEFAULT_HUB_ARGUMENT, accepts_argument

#: Recipe keys that are no tuner option (those are :data:`TOP_LEVEL_OPTIONS` and the ``tuner`` block).
RECIPE_ONLY_KEYS = (
    "hub",
    "hub_builder",
    "model",
    "data",
    "space",
    "tuner",
    "trainer",
    "hub_argument",
    "epochs_argument",
)
#: Options of :class:`~lightning_fms.options.StudyOptions` that are keys of the recipe itself.
TOP_LEVEL_OPTIONS = recipe_option_names(top_level=True)
#: Options of the ``tuner:`` block that are paths: taken from the recipe's folder when relative (as ``hub`` is).
PATH_OPTIONS = ("prior",)
#: Every key a recipe may have.
RECIPE_KEYS = frozenset((*RECIPE_ONLY_KEYS, *TOP_LEVEL_OPTIONS))
#: Keys of the recipe's ``tuner:`` block: the other options of :class:`~lightning_fms.options.StudyOptions`.
TUNER_KEYS = frozenset(recipe_option_names(top_level=False))


def resolve_path(raw: str, base_dir: Path | None) -> Path:
    """A recipe's path, expanded and, when relative, taken from ``base_dir``.

    Args:
        raw: The path as written: ``{cache}`` (``$LIGHTNING_FMS_CACHE`` or ``~/.cache/lightning_fms``), ``~`` and
            ``$VARS`` are expanded.
        base_dir: The recipe's folder (``None``: a relative path stays relative).
    """
    if "{cache}" in raw:
        from lightning_fms.zoo.build import default_cache_dir

        raw = raw.replace("{cache}", str(default_cache_dir()))
    path = Path(os.path.expandvars(os.path.expanduser(raw)))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def import_object(path: str, what: str) -> Any:
    """Import ``package.module.Name``.

    Raises:
        FMSError: the path does not import.
    """
    if not isinstance(path, str) or "." not in path:
        raise FMSError(f"{what}: {path!r} is not an import path like 'package.module.Class'")
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as error:
        raise FMSError(f"{what}: cannot import {path!r} ({error})") from None


@dataclass
class ClassSpec:
    """A class to instantiate: its import path and fixed arguments."""

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_value(cls, value: Any, what: str) -> ClassSpec:
        """Read ``{class_path: ..., init_args: {...}}`` or a bare import path."""
        if isinstance(value, str):
            return cls(value)
        if not isinstance(value, Mapping) or "class_path" not in value:
            raise FMSError(f"'{what}' must be an import path or a mapping with 'class_path' (and 'init_args')")
        unknown = set(value) - {"class_path", "init_args"}
        if unknown:
            raise FMSError(f"'{what}': unknown key(s) {sorted(unknown)}")
        init_args = value.get("init_args") or {}
        if not isinstance(init_args, Mapping):
            raise FMSError(f"'{what}.init_args' must be a mapping")
        return cls(str(value["class_path"]), dict(init_args))

    def resolve(self, what: str) -> Callable[..., Any]:
        """The class (or factory function) itself."""
        target = import_object(self.class_path, what)
        if not callable(target):
            raise FMSError(f"{what}: {self.class_path!r} is not a class or function")
        return target


@dataclass
class Recipe:
    """A validated study description. Build it with :meth:`from_yaml` or :meth:`from_dict`.

    ``tuner`` holds the given options of the recipe's ``tuner:`` block (:data:`TUNER_KEYS`).
    """

    model: ClassSpec
    data: ClassSpec
    space_spec: dict[str, Any]
    monitor: str
    mode: str = FALLBACK_MODE
    budget: int = declared_default("budget")
    max_epochs_per_trial: int = declared_default("max_epochs_per_trial")
    seed: int = declared_default("seed")
    hub_path: Path | None = None
    hub_builder: str | None = None
    tuner: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    hub_argument: str = DEFAULT_HUB_ARGUMENT
    epochs_argument: str = DEFAULT_EPOCHS_ARGUMENT

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Recipe:
        """Read and validate a recipe file; ``overrides`` (e.g. from the command line) win over the file.

        Args:
            path: The recipe YAML.
            overrides: Recipe keys or options of its ``tuner:`` block (``{"budget": 4, "searcher": "gp"}``);
                ``None`` values are ignored. A relative path among them (``prior``) is taken from the current
                directory, as a command-line flag's is.

        Raises:
            FMSError: the file is missing, not YAML, or not a valid recipe.
        """
        path = Path(path)
        if not path.is_file():
            raise FMSError(f"recipe {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise FMSError(f"recipe {path} is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
        if not isinstance(data, Mapping):
            raise FMSError(f"recipe {path} must be a mapping of settings")
        merged = dict(data)
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key in PATH_OPTIONS and isinstance(value, str):
                value = str(resolve_path(value, Path.cwd()))  # a flag's relative path is the shell's, not the recipe's
            if key in TUNER_KEYS:
                block = _mapping(merged.get("tuner"), "tuner")
                if key in OPTION_GROUPS and isinstance(value, Mapping):  # --ray.workers 2 updates the ray block
                    value = {**_mapping(block.get(key), f"tuner.{key}"), **value}
                merged["tuner"] = {**block, key: value}
            else:
                merged[key] = value
        return cls.from_dict(merged, base_dir=path.parent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: Path | None = None) -> Recipe:
        """Validate a recipe given as a mapping."""
        unknown = set(data) - RECIPE_KEYS
        if unknown:
            raise FMSError(f"unknown recipe key(s) {sorted(unknown)} (known: {', '.join(sorted(RECIPE_KEYS))})")
        for key in ("model", "data", "space", "monitor"):
            if data.get(key) is None:
                raise FMSError(f"the recipe needs '{key}'")
        tuner = _mapping(data.get("tuner"), "tuner")
        bad = set(tuner) - TUNER_KEYS
        if bad:
            raise FMSError(f"unknown tuner option(s) {sorted(bad)} (known: {', '.join(sorted(TUNER_KEYS))})")
        tuner = {
            key: check_option(key, value)
            for key, value in tuner.items()
            if key not in OPTION_GROUPS or value is not None
        }
        if "ray" in tuner:
            ray_settings(tuner["ray"].given())  # a bad setting fails here, before anything starts
        for key in PATH_OPTIONS:
            if tuner.get(key) is not None:
                tuner[key] = str(resolve_path(tuner[key], base_dir))
        study = {key: check_option(key, data[key]) for key in TOP_LEVEL_OPTIONS if data.get(key) is not None}
        trainer = data.get("trainer") or {}
        if not isinstance(trainer, Mapping):
            raise FMSError("'trainer' must be a mapping of Trainer arguments")
        hub_path = resolve_path(str(data["hub"]), base_dir) if data.get("hub") is not None else None
        return cls(
            model=ClassSpec.from_value(data["model"], "model"),
            data=ClassSpec.from_value(data["data"], "data"),
            space_spec=data["space"],
            **study,  # monitor, mode, budget, max_epochs_per_trial, seed: the recipe's defaults where missing
            hub_path=hub_path,
            hub_builder=data.get("hub_builder"),
            tuner=tuner,
            trainer=dict(trainer),
            hub_argument=_check_str(data.get("hub_argument", DEFAULT_HUB_ARGUMENT), "hub_argument"),
            epochs_argument=_check_str(data.get("epochs_argument", DEFAULT_EPOCHS_ARGUMENT), "epochs_argument"),
        )

    def load_hub(self) -> ModelHub | None:
        """The model hub, built first by ``hub_builder`` when its file is missing."""
        if self.hub_path is None:
            return None
        if not self.hub_path.exists() and self.hub_builder:
            builder = import_object(self.hub_builder, "hub_builder")
            builder(self.hub_path.parent)
        if not self.hub_path.exists():
            raise FMSError(
                f"hub file {self.hub_path} does not exist (build it first, e.g. python recipes/build_demo_hub.py)"
            )
        return ModelHub.from_yaml(self.hub_path)

    def build_space(self, hub: ModelHub | None) -> SearchSpace:
        """The search space, with the hub choice checked against the hub's entries."""
        return SearchSpace.from_dict(self.space_spec, hub_entries=hub.names if hub is not None else None)

    def build_executor(self, hub: ModelHub | None, space: SearchSpace, cap: int) -> InProcessExecutor:
        """The :class:`~lightning_fms.training.in_process.InProcessExecutor` that trains this recipe's trials.

        Args:
            hub: The recipe's hub (:meth:`load_hub`).
            space: The recipe's space (:meth:`build_space`).
            cap: The per-trial epoch cap (the LR schedule's horizon).

        Raises:
            FMSError: imports, or a space key that is no argument of the class it targets.
        """
        module_cls = self.model.resolve("model")
        data_cls = self.data.resolve("data")
        _check_space_targets(space, module_cls, data_cls, self.hub_argument)
        return InProcessExecutor.from_factories(
            module_cls,
            data_cls,
            space,
            hub,
            monitor=self.monitor,
            cap=cap,
            hub_argument=self.hub_argument,
            epochs_argument=self.epochs_argument,
            weights_attribute=self.tuner.get("weights_attribute"),
            module_options=self.model.init_args,
            datamodule_options=self.data.init_args,
            trainer_options=self.trainer,
        )

    def build_tuner(self, study_dir: str | os.PathLike[str], progress: bool = True) -> Any:
        """An :class:`~lightning_fms.tuner.FMSTuner` for this recipe.

        With a ``tuner.ray`` block its executor is a :class:`~lightning_fms.parallel.ray_executor.RayExecutor`
        (close it after the study: ``tuner.executor.close()``).

        Raises:
            FMSError: anything in the recipe that cannot work (imports, hub, space, arguments).
        """
        from lightning_fms.tuner import FMSTuner

        hub = self.load_hub()
        space = self.build_space(hub)
        executor: Any = self.build_executor(hub, space, self.max_epochs_per_trial)
        if "ray" in self.tuner:  # the epochs run on Ray workers, each with a copy of this executor
            executor = RayExecutor(executor, **ray_settings(self.tuner["ray"].given()))
        return FMSTuner(
            executor=executor,
            space=space,
            study_dir=study_dir,
            budget=self.budget,
            monitor=self.monitor,
            mode=self.mode,
            hub=hub,
            max_epochs_per_trial=self.max_epochs_per_trial,
            seed=self.seed,
            progress=progress,
            **tuner_arguments(self.tuner),  # weights_attribute went to the executor
        )


def _check_space_targets(space: SearchSpace, module_cls: Any, data_cls: Any, hub_argument: str) -> None:
    """Every ``model.*``/``data.*`` key must be an argument of the class it targets (checked before training)."""
    config_names = [n for n in space if n != space.hub_key]
    for name in config_names:
        target, _, key = name.partition(".")
        if not key:
            target, key = "model", name
        cls = {"model": module_cls, "data": data_cls}.get(target)
        if cls is None:
            raise FMSError(f"space key {name!r}: prefix must be 'model.' or 'data.'")
        if not accepts_argument(cls, key, unknown=True):
            raise FMSError(f"space key {name!r}: {getattr(cls, '__name__', cls)} has no argument {key!r}")
    if space.hub_key is not None and not accepts_argument(module_cls, hub_argument, unknown=True):
        raise FMSError(
            f"the model {getattr(module_cls, '__name__', module_cls)} has no argument {hub_argument!r} "
            "for the hub module"
        )


def _mapping(value: Any, name: str) -> dict[str, Any]:
    """A recipe section that must be a mapping (``None``: empty)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise FMSError(f"'{name}' must be a mapping, got {value!r}")
    return dict(value)


def _check_str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise FMSError(f"{name} must be a non-empty string, got {value!r}")
    return value
