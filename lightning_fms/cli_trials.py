"""CLITrialBuilder: the trial builder of :class:`~lightning_fms.lightning_cli.FMSLightningCLI`.

Every trial is instantiated by the CLI: the parsed base config, dumped without link targets, plus the trial's
values at their config keys, is parsed again (types validated, links applied) and instantiated by
:meth:`LightningCLI.instantiate_classes`, with the hyperparameters that ``save_hyperparameters`` records taken
from that trial's config. The hub choice is a parameter over pretrained weight files
(:class:`WeightFilesHub`). The builder plugs into
:class:`~lightning_fms.training.in_process.InProcessExecutor` like any other trial builder::

    builder = CLITrialBuilder(cli, space, base_dir, cap=20, max_epochs_key="model.max_epochs")
    executor = InProcessExecutor(builder, hub=builder.hub)  # the tuner's jobs name the monitor (and cap=20)
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import tempfile
import warnings
from argparse import ArgumentError
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from torch import nn

from lightning_fms.atomic import atomic_write_text
from lightning_fms.errors import FMSError
from lightning_fms.hub import HubEntry, ModelHub, bind_weight_files
from lightning_fms.search.space import CategoricalParam, FloatParam, IntParam, SearchSpace
from lightning_fms.training.callback import FMSCheckpointCallback
from lightning_fms.training.quiet import quiet_lightning
from lightning_fms.training.trainer import TUNER_TRAINER_KEYS, trainer_for
from lightning_fms.training.trial_builder import BuiltTrial, trial_cap

__all__ = ["CLITrialBuilder", "WeightFilesHub"]

_NOT_SEARCHABLE = {"tuner", "seed_everything", "ckpt_path", "weights_only", "config", "subcommand"}


def _error_detail(error: BaseException) -> str:
    """The informative line of a jsonargparse error (they nest the cause under several lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Expected", "Option", "Not a valid", "Value", "Does not validate against")) and (
            "Union subtypes" not in line
        ):
            return line
    for line in lines:
        if "Got value" in line or "not accepted" in line or "Key " in line:
            return line
    return lines[-1] if lines else type(error).__name__


class WeightFilesHub(ModelHub):
    """The hub choice over weight files: entries are the files; ``build`` gives the module built with one.

    Args:
        entries: One entry per weights file (named as the space names the file).
        load: ``load(name) -> module``: the network built with that file.
    """

    def __init__(self, entries: Sequence[HubEntry], load: Callable[[str], nn.Module]) -> None:
        super().__init__(entries, name="weights")
        self._load = load

    def build(self, name: str) -> nn.Module:
        """The LightningModule (or its ``weights_attribute``) built by the CLI with this weights file."""
        self.entry(name)
        return self._load(name)


class CLITrialBuilder:
    """Instantiates trials through a ``LightningCLI``: base config + the trial's values at their config keys.

    Checks every space key against the parsed config, and every value the space can produce (each choice,
    both ends of each range) against the parser, when it is built.

    Args:
        cli: The CLI, after parsing (its config is the base of every trial). With subcommands, the trials
            are those of the subcommand it parsed.
        space: The search space; keys are config keys (``model.init_args.lr``, ``model.lr``, ``data.batch_size``).
        base_dir: Folder relative hub-choice paths are taken from first (then the current directory).
        cap: The per-trial epoch cap, written at ``max_epochs_key`` for the builds outside a study's jobs (the
            checks when it is built, the pretrained weights); ``None``: only a job's cap. A job with another cap
            is refused.
        max_epochs_key: Config key that receives the cap (e.g. ``model.init_args.max_epochs``); ``None``: none.
        weights_attribute: Submodule of the LightningModule that :meth:`pretrained` returns (``""``: all of it).
        reads_weights: The surrogate reads weights (then every searched key must be ``model.*`` or ``data.*``).

    Raises:
        FMSError: a key or value the config or its parser does not accept, or a missing weights file.
    """

    def __init__(
        self,
        cli: LightningCLI,
        space: SearchSpace,
        base_dir: Path | None,
        *,
        cap: int | None = None,
        max_epochs_key: str | None = None,
        weights_attribute: str = "",
        reads_weights: bool = False,
    ) -> None:
        self.cli = cli
        self.sub: str | None = cli.subcommand
        self.cap = cap
        self.weights_attribute = weights_attribute
        self.base_dir = base_dir
        self.max_epochs_key = max_epochs_key
        self.reads_weights = reads_weights
        parser = cli.parser
        full = yaml.safe_load(parser.dump(cli.config, skip_link_targets=True, skip_none=False))
        self._section(full).pop("tuner", None)
        self.base = full
        self._with_links = self._section(
            yaml.safe_load(parser.dump(cli.config, skip_link_targets=False, skip_none=False))
        )
        self.space = space
        if reads_weights:
            outside = [n for n in space if n != space.hub_key and not n.startswith(("model.", "data."))]
            if outside:
                raise FMSError(
                    f"space key(s) {outside}: with a weights featurizer the searched keys must be model.* or data.*"
                )
        self.paths = {name: self._resolve_key(name) for name in space}
        self.cap_path = None
        if max_epochs_key:
            self.cap_path = self._resolve_key(max_epochs_key, what="--tuner.max_epochs_key")
        self.hub: WeightFilesHub | None = None
        """The hub choice's weight files (``None``: the space has no hub choice)."""
        if space.hub_key is not None:
            self.hub = self._weights_hub(space, base_dir)
        self._cache: dict[str, Namespace] = {}
        self._modules: dict[str, nn.Module] = {}
        self._warn_ignored_trainer_options()
        self._probe()

    def _section(self, tree: Any) -> Any:
        """The part of a config tree that belongs to the parsed subcommand (all of it without subcommands)."""
        return tree[self.sub] if self.sub else tree

    # ------------------------------------------------------------------ keys and values
    def _resolve_key(self, name: str, what: str = "space key") -> tuple[str, ...]:
        parts = name.split(".")
        if parts[0] in _NOT_SEARCHABLE:
            raise FMSError(f"{what} {name!r}: {parts[0]!r} cannot be searched")
        if parts[0] == "trainer" and len(parts) == 2 and parts[1] in TUNER_TRAINER_KEYS:
            raise FMSError(f"{what} {name!r}: the tuner sets trainer.{parts[1]} itself")
        node: Any = self._section(self.base)
        path: list[str] = []
        for depth, part in enumerate(parts):
            if isinstance(node, dict) and part in node:
                path.append(part)
                node = node[part]
            elif isinstance(node, dict) and isinstance(node.get("init_args"), dict) and part in node["init_args"]:
                path += ["init_args", part]
                node = node["init_args"][part]
            else:
                if self._in_config(self._with_links, parts):
                    raise FMSError(f"{what} {name!r} is set by a link in the parser; search its source instead")
                where = ".".join(parts[:depth]) or "the config"
                known = sorted(node) if isinstance(node, dict) else []
                if isinstance(node, dict) and isinstance(node.get("init_args"), dict):
                    known = sorted(set(known) - {"class_path", "init_args", "dict_kwargs"} | set(node["init_args"]))
                hint = f" ({where} has: {', '.join(known)})" if known else ""
                raise FMSError(f"{what} {name!r} is not in the parsed config{hint}")
        return tuple(path)

    @staticmethod
    def _in_config(config: Any, parts: Sequence[str]) -> bool:
        node = config
        for part in parts:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, dict) and isinstance(node.get("init_args"), dict) and part in node["init_args"]:
                node = node["init_args"][part]
            else:
                return False
        return True

    def _weights_hub(self, space: SearchSpace, base_dir: Path | None) -> WeightFilesHub:
        key = str(space.hub_key)
        model = self._section(self.base).get("model")
        class_path = model.get("class_path") if isinstance(model, dict) else None
        class_path = class_path or f"{type(self.cli.model).__module__}.{type(self.cli.model).__qualname__}"
        entries = []
        for choice in space[key].choices:
            if not isinstance(choice, str):
                raise FMSError(f"hub choice {key!r}: {choice!r} is not a weights file path")
            path = Path(os.path.expanduser(choice))
            candidates = [path] if path.is_absolute() else [d / path for d in (base_dir, Path.cwd()) if d is not None]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                looked = ", ".join(str(c) for c in candidates)
                raise FMSError(f"hub choice {key!r}: weights file {choice!r} does not exist (looked for {looked})")
            entries.append(
                HubEntry(name=choice, family=path.stem, class_path=class_path, init_args={}, weights=found.resolve())
            )
        return WeightFilesHub(entries, self.pretrained)

    def _raw(self, values: Mapping[str, Any], cap: int | None = None) -> dict[str, Any]:
        raw = copy.deepcopy(self.base)
        for name, value in bind_weight_files(values, self.space.hub_key, self.hub).items():
            _set_path(self._section(raw), self.paths[name], value)
        cap = trial_cap(self.cap, cap)
        if self.cap_path is not None and cap is not None:
            _set_path(self._section(raw), self.cap_path, cap)
        return raw

    def _parse(self, raw: dict[str, Any], what: str) -> Namespace:
        parser = self.cli.parser
        before = parser.exit_on_error
        parser.exit_on_error = False
        try:
            return parser.parse_object(raw)
        except ArgumentError as error:
            raise FMSError(f"{what}: the config parser rejects it ({_error_detail(error)})") from None
        finally:
            parser.exit_on_error = before

    def _probe(self) -> None:
        """Parse every choice and both ends of every range, so a bad space fails before training."""
        self._parse(self._raw({}), "the config with the tuner's settings")
        for name, param in self.space.items():
            if isinstance(param, CategoricalParam):
                probes = list(param.choices)
            elif isinstance(param, (FloatParam, IntParam)):
                probes = [param.low, param.high]
            else:
                probes = []
            for value in probes:
                self._parse(self._raw({name: value}), f"space key {name!r} = {value!r}")

    def _warn_ignored_trainer_options(self) -> None:
        given = self._with_links.get("trainer") or {}
        ignored = [key for key in ("callbacks", "logger") if given.get(key) not in (None, False, True, [])]
        if ignored:
            warnings.warn(
                f"--tuner: the config's trainer.{' and trainer.'.join(ignored)} are not used by the trials "
                "(each trial logs to <study_dir>/trials/<id>/logs; for W&B use --tuner.wandb.*)",
                stacklevel=1,
            )

    # ------------------------------------------------------------------ instantiation
    def __call__(self, config: Mapping[str, Any], trial_dir: Path | None = None, cap: int | None = None) -> BuiltTrial:
        """Parse and instantiate one trial's config through the CLI.

        Args:
            config: The trial's configuration (space keys to values).
            trial_dir: Where the trial's ``config.yaml`` is written (once), which ``fit --config`` replays.
            cap: The study's per-trial cap, written at ``max_epochs_key`` (``None``: the builder's own).

        Returns:
            The module, the datamodule (``None`` when the config has none), and the Trainer arguments of
            the config that the tuner does not set itself.

        Raises:
            FMSError: the parser rejects the configuration, or ``cap`` contradicts the builder's own.
        """
        key = json.dumps([dict(config), cap], sort_keys=True, default=str)
        cfg = self._cache.get(key)
        if cfg is None:
            cfg = self._parse(self._raw(config, cap), f"trial configuration {dict(config)}")
            self._cache[key] = cfg
        if trial_dir is not None and not (trial_dir / "config.yaml").exists():
            dumped = self._section(yaml.safe_load(self.cli.parser.dump(cfg)))
            dumped.pop("tuner", None)
            trial_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(trial_dir / "config.yaml", yaml.safe_dump(dumped, sort_keys=False))
        cli = self.cli
        saved = (cli.config, cli.config_init, cli.model, cli.datamodule, cli.trainer)
        cli.config = cfg
        cli.__dict__.pop("config_dump", None)  # save_hyperparameters reads the dump of *this* config
        try:
            with quiet_lightning(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                cli.instantiate_classes()
            module, datamodule = cli.model, cli.datamodule
            trainer = self._section(cli.config_init).get("trainer")
        finally:
            cli.config, cli.config_init, cli.model, cli.datamodule, cli.trainer = saved
            cli.__dict__.pop("config_dump", None)
        return BuiltTrial(module, datamodule, _trainer_options(trainer))

    def pretrained(self, entry: str) -> nn.Module:
        """W_0 of a hub entry: the module built with that weights file (its ``weights_attribute`` submodule)."""
        if entry not in self._modules:
            with torch.random.fork_rng(devices=[]):
                module = self({self.space.hub_key: entry} if self.space.hub_key else {}).module
            attribute = self.weights_attribute
            self._modules[entry] = module.get_submodule(attribute) if attribute else module
        return copy.deepcopy(self._modules[entry])

    def preflight(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None, monitor: str) -> None:
        """One ``fast_dev_run`` batch of the config's model: the monitored metric must be logged.

        The Trainer is a trial's (:func:`~lightning_fms.training.trainer.trainer_for`, with the config's
        Trainer arguments), plus ``fast_dev_run=1``; the check is no trial of the study, so it takes seed 0.

        Raises:
            FMSError: the metric was not logged.
        """
        options = _trainer_options(self._section(self.cli.config_init).get("trainer"))
        with quiet_lightning(), tempfile.TemporaryDirectory() as scratch:
            options.update(default_root_dir=scratch, fast_dev_run=1)
            checkpoint = FMSCheckpointCallback(monitor=monitor, weights_attribute=None)
            trainer = trainer_for(model, epochs=1, seed=0, trial_id=0, checkpoint=checkpoint, options=options)
            trainer.fit(model, datamodule=datamodule)
        logged = sorted(trainer.callback_metrics)
        if monitor not in logged:
            raise FMSError(
                f"metric {monitor!r} was never logged by {type(model).__name__} in a one-batch check "
                f"(logged: {', '.join(logged) or 'none'})"
            )


def _set_path(node: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def _trainer_defaults() -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(pl.Trainer.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _trainer_options(trainer: Any) -> dict[str, Any]:
    """The config's Trainer arguments that differ from the defaults, less those the tuner sets."""
    if trainer is None:
        return {}
    given = dict(vars(trainer)) if isinstance(trainer, Namespace) else dict(trainer)
    defaults = _trainer_defaults()
    out = {}
    for key, value in given.items():
        if key in TUNER_TRAINER_KEYS or key in ("callbacks", "logger", "fast_dev_run"):
            continue
        try:
            same = bool(key in defaults and value == defaults[key])
        except Exception:  # an object without a usable __eq__
            same = False
        if not same:
            out[key] = value
    return out
