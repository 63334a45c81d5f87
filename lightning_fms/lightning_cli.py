"""FMSLightningCLI: ``LightningCLI`` with a ``--tuner fms`` option on ``fit``.

A user changes one import::

    from lightning_fms import FMSLightningCLI as LightningCLI

and runs ``python train.py fit --config cfg.yaml --tuner fms --tuner.space space.yaml --tuner.budget 100
--tuner.study_dir runs/s1``. Without ``--tuner`` the script behaves like ``LightningCLI``.

How a study runs through the CLI:

* The search space (``--tuner.space``: a W&B sweep YAML or the recipe form, see :mod:`lightning_fms.sweep`)
  names parameters by their **config keys** (``model.init_args.lr``, ``model.lr`` as a shorthand in
  subclass mode, ``data.batch_size``, ``optimizer.init_args.lr``, ...). Every key is checked against the
  parsed config, and every value the space can produce (each choice, both ends of each range) against
  the parser, before anything trains.
* Every trial is **instantiated by the CLI**: the parsed base config, dumped without link targets, plus the
  trial's values at their keys, is parsed again (types validated, links applied) and instantiated by
  :meth:`LightningCLI.instantiate_classes`, with the hyperparameters that ``save_hyperparameters`` records
  taken from that trial's config (so a checkpoint's ``hyper_parameters`` are the ones it trained with).
  The trial's config is written to ``trials/<id>/config.yaml``; ``python train.py fit --config`` replays it.
* The hub choice is a parameter over pretrained **weight files** bound to the config key through which the
  module receives them (``{type: hub, choices: [a.safetensors, b.safetensors]}``, or any categorical named
  by ``--tuner.hub_key``). Relative paths are taken from the space file's folder, then from the current
  directory. With a weights featurizer (``--tuner.weights gmn`` ...), the module built with a file (its
  ``--tuner.weights_attribute`` submodule) is that entry's W_0.
* The loop is :class:`~lightning_fms.tuner.FMSTuner`'s; each epoch runs in a fresh Trainer built from the
  config's ``trainer`` arguments (accelerator, precision, limits, ...) except those the tuner sets itself
  (``max_epochs``, ``callbacks``, ``logger``, checkpointing, progress bar, sanity steps, validation interval).
* Before the study, a one-batch ``fast_dev_run`` fit of the config's model checks that the monitored
  metric is logged (``--tuner.preflight false`` skips it).

Every input problem ends the program with one line, ``lightning-fms: error: ...``, and exit status 2.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import sys
import tempfile
import warnings
from argparse import ArgumentError
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import nn

from lightning_fms.errors import FMSError, error_line
from lightning_fms.hub import HubEntry, ModelHub
from lightning_fms.options import TUNERS, TunerOptions, WandbOptions, tuner_arguments
from lightning_fms.search.seeds import seed_everything_quietly
from lightning_fms.search.space import CategoricalParam, FloatParam, HubChoice, IntParam, SearchSpace
from lightning_fms.study.directory import atomic_write_text
from lightning_fms.sweep import read_space_file
from lightning_fms.training.executor import TUNER_TRAINER_KEYS, EpochJob, EpochOutcome, InProcessExecutor
from lightning_fms.training.quiet import quiet_lightning

if TYPE_CHECKING:
    from lightning_fms.tuner import TuneResult

__all__ = ["TUNERS", "FMSLightningCLI", "TunerOptions", "WandbOptions"]

log = logging.getLogger(__name__)

_NOT_SEARCHABLE = {"tuner", "seed_everything", "ckpt_path", "weights_only", "config", "subcommand"}


def _exit_with(error: FMSError) -> NoReturn:
    print(error_line(error), file=sys.stderr)
    raise SystemExit(2)


def rewrite_tuner_flag(argv: Sequence[str]) -> list[str]:
    """Turn ``--tuner fms`` / ``--tuner=fms`` into ``--tuner.name=fms`` (``--tuner FILE`` stays a group config file).

    Raises:
        FMSError: an unknown ``--tuner`` value (the message lists the supported ones).
    """
    out: list[str] = []
    args = list(argv)
    index = 0
    while index < len(args):
        token = args[index]
        if token == "--":
            out.extend(args[index:])
            break
        if token == "--tuner" or token.startswith("--tuner="):
            if token == "--tuner":
                if index + 1 >= len(args):
                    raise FMSError(f"--tuner needs a value (supported: {', '.join(TUNERS)})")
                value = args[index + 1]
                index += 2
            else:
                value = token.partition("=")[2]
                index += 1
            if value in TUNERS:
                out.append(f"--tuner.name={value}")
            elif value.lower() in ("null", "none"):
                out.append("--tuner.name=null")
            elif Path(value).is_file():
                out.extend(["--tuner", value])
            else:
                raise FMSError(f"unknown --tuner value {value!r} (supported: {', '.join(TUNERS)})")
            continue
        out.append(token)
        index += 1
    return out


class FMSLightningCLI(LightningCLI):
    """``LightningCLI`` whose ``fit`` runs a Forecasting Model Search study when given ``--tuner fms``.

    Takes exactly ``LightningCLI``'s arguments. Every subcommand parser gets a ``tuner`` group
    (:class:`TunerOptions`; ``--tuner fms`` is short for ``--tuner.name fms``). With the tuner, ``fit``
    runs :class:`~lightning_fms.tuner.FMSTuner` over the search space instead of one training, prints a
    JSON summary and stores the result in :attr:`tune_result`; ``before_fit``/``after_fit`` still run.
    Without it, ``fit`` is ``trainer.fit``.

    Example (``train.py``)::

        from lightning_fms import FMSLightningCLI as LightningCLI
        from my_project import MyModule, MyData

        if __name__ == "__main__":
            LightningCLI(MyModule, MyData)

    then ``python train.py fit --config cfg.yaml --tuner fms --tuner.space space.yaml --tuner.budget 100
    --tuner.study_dir runs/s1``.
    """

    tune_result: TuneResult | None = None
    """The study's result after ``fit --tuner fms`` (``None`` otherwise)."""

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add LightningCLI's defaults and the ``tuner`` group."""
        super().add_default_arguments_to_parser(parser)
        parser.add_class_arguments(
            TunerOptions,
            "tuner",
            help="Forecasting Model Search (--tuner fms runs a study instead of one fit; see docs/cli.md)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as ``LightningCLI`` does, after turning ``--tuner fms`` into ``--tuner.name=fms``."""
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
        else:
            argv = sys.argv[1:] if args is None else list(args)
            try:
                rewritten = rewrite_tuner_flag(argv)
            except FMSError as error:
                _exit_with(error)
            if args is None:
                self.config = parser.parse_args(rewritten)
            else:
                super().parse_arguments(parser, rewritten)
        subcommand = self.config.get("subcommand")
        if self._tuner_name() is not None and subcommand != "fit":
            where = f"the {subcommand!r} subcommand" if subcommand else "a CLI without subcommands (run=False)"
            _exit_with(FMSError(f"--tuner runs with the 'fit' subcommand, not with {where}"))

    def _subconfig(self, config: Namespace) -> Namespace:
        subcommand = config.get("subcommand")
        return config[subcommand] if subcommand else config

    def _tuner_name(self) -> str | None:
        tuner = self._subconfig(self.config).get("tuner")
        return None if tuner is None else tuner.get("name")

    def fit(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None, **kwargs: Any) -> Any:
        """``trainer.fit`` without a tuner; with ``--tuner fms``, the study.

        Raises:
            SystemExit: status 2 after a one-line message for bad input; 130 when interrupted.
        """
        if self._tuner_name() is None:
            return self.trainer.fit(model, datamodule=datamodule, **kwargs)
        try:
            self.tune_result = self._tune(model, datamodule, kwargs)
        except FMSError as error:
            _exit_with(error)
        except KeyboardInterrupt:
            print("lightning-fms: interrupted; the study keeps every completed epoch", file=sys.stderr)
            raise SystemExit(130) from None
        return self.tune_result

    # ------------------------------------------------------------------ the study
    def _tune(
        self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None, fit_kwargs: dict[str, Any]
    ) -> TuneResult:
        from lightning_fms.tuner import FMSTuner

        if fit_kwargs.get("ckpt_path"):
            raise FMSError("--ckpt_path cannot be combined with --tuner (a study resumes from its --tuner.study_dir)")
        options = self.config_init[self.subcommand]["tuner"]
        if not isinstance(options, TunerOptions):  # a user's instantiate_classes may leave the namespace
            options = _options_from_namespace(self.config[self.subcommand]["tuner"])
        if options.space is None:
            raise FMSError("--tuner fms needs --tuner.space (a search-space YAML or a W&B sweep YAML)")
        if not options.study_dir:
            raise FMSError("--tuner fms needs --tuner.study_dir")
        space_file = read_space_file(options.space)
        space = space_file.space
        if options.hub_key is not None:
            space = _mark_hub_choice(space, options.hub_key)
        monitor = options.monitor or space_file.monitor
        mode = options.mode or (space_file.mode if monitor == space_file.monitor else None)
        if not monitor:
            raise FMSError("no metric to optimise: give --tuner.monitor (or a 'metric' in the space file)")
        if mode is None:
            raise FMSError(f"give --tuner.mode max or min for {monitor!r} (or metric.goal in the space file)")
        observers = []
        if options.wandb.enabled:
            from lightning_fms.loggers.wandb import WandbStudyLogger

            observers.append(WandbStudyLogger(**vars(options.wandb)))
        builder = _TrialBuilder(self, space, space_file.base_dir, options)
        weights_attribute = options.weights_attribute or ""  # unset: the whole module built with a weights file
        tuner = FMSTuner(
            _not_used,
            _not_used,
            space,
            study_dir=options.study_dir,
            **{**tuner_arguments(options), "monitor": monitor, "mode": mode},
            hub=builder.hub,
            epochs_argument="",
            weights_attribute=weights_attribute,
            progress=options.progress,
            observers=observers,
            executor=_CLIExecutor(
                builder,
                InProcessExecutor(
                    _not_used,
                    _not_used,
                    space,
                    builder.hub,
                    monitor=monitor,
                    cap=options.max_epochs_per_trial,
                    epochs_argument="",
                    weights_attribute=weights_attribute,
                ),
            ),
        )
        if options.preflight:
            builder.preflight(model, datamodule, monitor)
        result = tuner.run()
        print(json.dumps(result.summary(), indent=2, default=str))
        return result


def _not_used(**kwargs: Any) -> Any:
    raise FMSError("internal: FMSLightningCLI builds trials through the CLI")


def _options_from_namespace(namespace: Namespace) -> TunerOptions:
    values = namespace.as_dict()
    values["wandb"] = WandbOptions(**(values.get("wandb") or {}))
    return TunerOptions(**values)


def _mark_hub_choice(space: SearchSpace, key: str) -> SearchSpace:
    """The space with the categorical ``key`` turned into the hub choice."""
    if key not in space:
        raise FMSError(f"--tuner.hub_key {key!r} is not a parameter of the space (it has: {', '.join(space)})")
    param = space[key]
    if not isinstance(param, CategoricalParam):
        raise FMSError(f"--tuner.hub_key {key!r} must be a categorical over weight files")
    if isinstance(param, HubChoice):
        return space
    if space.hub_key is not None:
        raise FMSError(f"the space already has a hub choice {space.hub_key!r}")
    return SearchSpace({name: HubChoice(p.choices) if name == key else p for name, p in space.items()})


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


class _WeightFilesHub(ModelHub):
    """The hub choice over weight files: entries are the files; ``build`` gives the module built with one."""

    def __init__(self, entries: Sequence[HubEntry], load: Any) -> None:
        super().__init__(entries, name="weights")
        self._load = load

    def build(self, name: str) -> nn.Module:
        """The LightningModule (or its ``weights_attribute``) built by the CLI with this weights file."""
        self.entry(name)
        return self._load(name)


class _TrialBuilder:
    """Instantiates trials through the CLI: base config + the trial's values at their config keys."""

    def __init__(self, cli: FMSLightningCLI, space: SearchSpace, base_dir: Path | None, options: TunerOptions):
        self.cli = cli
        self.sub = str(cli.subcommand)
        self.options = options
        parser = cli.parser
        full = yaml.safe_load(parser.dump(cli.config, skip_link_targets=True, skip_none=False))
        full[self.sub].pop("tuner", None)
        self.base = full
        self._with_links = yaml.safe_load(parser.dump(cli.config, skip_link_targets=False, skip_none=False))[self.sub]
        self.space = space
        if options.weights != "none":
            outside = [n for n in space if n != space.hub_key and not n.startswith(("model.", "data."))]
            if outside:
                raise FMSError(
                    f"space key(s) {outside}: with a weights featurizer the searched keys must be model.* or data.*"
                )
        self.paths = {name: self._resolve_key(name) for name in space}
        self.cap_path = None
        if options.max_epochs_key:
            self.cap_path = self._resolve_key(options.max_epochs_key, what="--tuner.max_epochs_key")
        self.hub = None
        self.files: dict[str, str] = {}
        if space.hub_key is not None:
            self.hub = self._weights_hub(space, base_dir)
        self._cache: dict[str, Namespace] = {}
        self._modules: dict[str, nn.Module] = {}
        self._warn_ignored_trainer_options()
        self._probe()

    # ------------------------------------------------------------------ keys and values
    def _resolve_key(self, name: str, what: str = "space key") -> tuple[str, ...]:
        parts = name.split(".")
        if parts[0] in _NOT_SEARCHABLE:
            raise FMSError(f"{what} {name!r}: {parts[0]!r} cannot be searched")
        if parts[0] == "trainer" and len(parts) == 2 and parts[1] in TUNER_TRAINER_KEYS:
            raise FMSError(f"{what} {name!r}: the tuner sets trainer.{parts[1]} itself")
        node: Any = self.base[self.sub]
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

    def _weights_hub(self, space: SearchSpace, base_dir: Path | None) -> ModelHub:
        key = str(space.hub_key)
        model = self.base[self.sub].get("model")
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
            self.files[choice] = str(found.resolve())
            entries.append(
                HubEntry(name=choice, family=path.stem, class_path=class_path, init_args={}, weights=found.resolve())
            )
        return _WeightFilesHub(entries, self.pretrained)

    def _raw(self, values: Mapping[str, Any]) -> dict[str, Any]:
        raw = copy.deepcopy(self.base)
        for name, value in values.items():
            if name == self.space.hub_key:
                value = self.files[value]
            _set_path(raw[self.sub], self.paths[name], value)
        if self.cap_path is not None:
            _set_path(raw[self.sub], self.cap_path, self.options.max_epochs_per_trial)
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
    def instantiate(
        self, config: Mapping[str, Any], trial_dir: Path | None = None
    ) -> tuple[pl.LightningModule, pl.LightningDataModule | None, dict[str, Any]]:
        """Parse and instantiate one trial's config through the CLI.

        Returns:
            The module, the datamodule (``None`` when the config has none), and the Trainer arguments of
            the config that the tuner does not set itself.
        """
        key = json.dumps(dict(config), sort_keys=True, default=str)
        cfg = self._cache.get(key)
        if cfg is None:
            cfg = self._parse(self._raw(config), f"trial configuration {dict(config)}")
            self._cache[key] = cfg
        if trial_dir is not None and not (trial_dir / "config.yaml").exists():
            dumped = yaml.safe_load(self.cli.parser.dump(cfg))[self.sub]
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
            trainer = cli.config_init[self.sub].get("trainer")
        finally:
            cli.config, cli.config_init, cli.model, cli.datamodule, cli.trainer = saved
            cli.__dict__.pop("config_dump", None)
        return module, datamodule, _trainer_options(trainer)

    def pretrained(self, entry: str) -> nn.Module:
        """W_0 of a hub entry: the module built with that weights file (its ``weights_attribute`` submodule)."""
        if entry not in self._modules:
            with torch.random.fork_rng(devices=[]):
                module, _, _ = self.instantiate({self.space.hub_key: entry} if self.space.hub_key else {})
            attribute = self.options.weights_attribute
            self._modules[entry] = module.get_submodule(attribute) if attribute else module
        return copy.deepcopy(self._modules[entry])

    def preflight(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None, monitor: str) -> None:
        """One ``fast_dev_run`` batch of the config's model: the monitored metric must be logged.

        Raises:
            FMSError: the metric was not logged.
        """
        options = _trainer_options(self.cli.config_init[self.sub].get("trainer"))
        with quiet_lightning(), tempfile.TemporaryDirectory() as scratch:
            options.update(
                default_root_dir=scratch,
                fast_dev_run=1,
                logger=False,
                callbacks=[],
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            trainer = pl.Trainer(**options)
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


class _CLIExecutor(InProcessExecutor):
    """The in-process executor with trials instantiated through the CLI (and their config saved)."""

    def __init__(self, builder: _TrialBuilder, base: InProcessExecutor) -> None:
        super().__init__(
            base.module_factory,
            base.datamodule_factory,
            base.space,
            base.hub,
            monitor=base.monitor,
            cap=base.cap,
            hub_argument=base.hub_argument,
            epochs_argument=base.epochs_argument,
            weights_attribute=base.weights_attribute,
        )
        self.record_weights = base.record_weights
        self.builder = builder
        self._job: EpochJob | None = None

    def run_epoch(self, job: EpochJob) -> EpochOutcome:
        """Train one epoch (see :meth:`InProcessExecutor.run_epoch`)."""
        self._job = job
        try:
            return super().run_epoch(job)
        finally:
            self._job = None

    def build(
        self, config: dict[str, Any], seed: int | None = None
    ) -> tuple[pl.LightningModule, pl.LightningDataModule]:
        """Instantiate the trial through the CLI, after seeding like the base executor."""
        if seed is not None:
            seed_everything_quietly(seed)
        trial_dir = self._job.log_dir if self._job is not None else None
        module, datamodule, trainer_options = self.builder.instantiate(config, trial_dir)
        self.trainer_options = trainer_options
        return module, datamodule  # type: ignore[return-value]
