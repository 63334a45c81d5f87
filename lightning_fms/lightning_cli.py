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
* Every trial is **instantiated by the CLI** (:class:`~lightning_fms.cli_trials.CLITrialBuilder`): the parsed
  base config, dumped without link targets, plus the trial's values at their keys, is parsed again (types
  validated, links applied) and instantiated by :meth:`LightningCLI.instantiate_classes`, with the
  hyperparameters that ``save_hyperparameters`` records taken from that trial's config (so a checkpoint's
  ``hyper_parameters`` are the ones it trained with). The trial's config is written to
  ``trials/<id>/config.yaml``; ``python train.py fit --config`` replays it.
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
* ``--tuner.ray.workers 4`` (or any ``--tuner.ray.*`` option) runs the epochs on a Ray cluster; each worker builds
  the CLI again from the parsed config (:class:`CLIExecutorFactory`), see docs/ray.md.

Every input problem ends the program with one line, ``lightning-fms: error: ...``, and exit status 2.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_fms.cli_trials import CLITrialBuilder
from lightning_fms.errors import FMSError, error_line
from lightning_fms.options import TUNERS, RayOptions, TunerOptions, WandbOptions, check_option, tuner_arguments
from lightning_fms.parallel.ray_executor import RayExecutor, ray_settings
from lightning_fms.search.searcher import resolve_weights
from lightning_fms.search.space import CategoricalParam, HubChoice, SearchSpace
from lightning_fms.sweep import read_space_file
from lightning_fms.training.in_process import InProcessExecutor

if TYPE_CHECKING:
    from lightning_fms.tuner import TuneResult

__all__ = ["TUNERS", "FMSLightningCLI", "TunerOptions", "WandbOptions"]

log = logging.getLogger(__name__)


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._init_arguments = (args, {k: v for k, v in kwargs.items() if k not in ("args", "run")})
        super().__init__(*args, **kwargs)

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
        ray = None
        if options.ray.enabled:  # bad settings fail here, in the words of a recipe's
            ray = ray_settings(check_option("ray", options.ray.given()).given())
        observers = []
        if options.wandb.enabled:
            from lightning_fms.loggers.wandb import WandbStudyLogger

            observers.append(WandbStudyLogger(**vars(options.wandb)))
        weights_attribute = options.weights_attribute or ""  # unset: the whole module built with a weights file
        builder = CLITrialBuilder(
            self,
            space,
            space_file.base_dir,
            cap=options.max_epochs_per_trial,
            max_epochs_key=options.max_epochs_key,
            weights_attribute=weights_attribute,
            reads_weights=resolve_weights(options.searcher, space, options.weights) != "none",
        )
        executor: Any = InProcessExecutor(
            builder, monitor=monitor, hub=builder.hub, weights_attribute=weights_attribute
        )
        if ray is not None:  # each Ray worker builds the CLI and its trial builder again, from this config
            factory = CLIExecutorFactory.of(self, builder, monitor)
            executor = RayExecutor(factory, local=executor, **ray)
        tuner = FMSTuner(
            executor=executor,
            space=space,
            study_dir=options.study_dir,
            **{**tuner_arguments(options), "monitor": monitor, "mode": mode},
            hub=builder.hub,
            progress=options.progress,
            observers=observers,
        )
        if options.preflight:
            builder.preflight(model, datamodule, monitor)
        try:
            result = tuner.run()
        finally:
            if ray is not None:
                executor.close()
        print(json.dumps(result.summary(), indent=2, default=str))
        return result


@dataclass
class CLIExecutorFactory:
    """Builds on a Ray worker the epoch executor of a study run by :class:`FMSLightningCLI` (a picklable recipe).

    A LightningCLI does not travel to another process, so each worker builds the CLI again (the same class and
    arguments, ``run=False``) from the parsed config, without the tuner's options and the subcommand's own
    arguments, and then the trial builder and the in-process executor as the driver built them.

    Attributes:
        cli_class: The CLI class (pickled by reference, or by value when it is defined in ``__main__``).
        init_args: Its positional arguments.
        init_kwargs: Its keyword arguments, less ``args`` and ``run``.
        config: The parsed config of the subcommand, less ``tuner``, ``config`` and the subcommand's arguments.
        space: The search space.
        base_dir: Folder relative hub-choice paths are taken from first.
        cap: The per-trial epoch cap.
        max_epochs_key: Config key receiving the cap.
        weights_attribute: Submodule whose weights are recorded.
        reads_weights: Whether the surrogate reads weights.
        monitor: The monitored metric.
    """

    cli_class: type
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    config: dict[str, Any]
    space: SearchSpace
    base_dir: Path | None
    cap: int | None
    max_epochs_key: str | None
    weights_attribute: str
    reads_weights: bool
    monitor: str

    @classmethod
    def of(cls, cli: FMSLightningCLI, builder: CLITrialBuilder, monitor: str) -> CLIExecutorFactory:
        """The factory of the executor that ``cli`` runs with ``builder``."""
        args, kwargs = getattr(cli, "_init_arguments", ((), {}))
        config = copy.deepcopy(builder.base)
        section = config[builder.sub] if builder.sub else config
        subcommand_arguments = set(inspect.signature(pl.Trainer.fit).parameters) if builder.sub else set()
        for key in {"tuner", "config", *subcommand_arguments}:
            section.pop(key, None)
        return cls(
            cli_class=type(cli),
            init_args=tuple(args),
            init_kwargs={**kwargs, "save_config_callback": None},
            config=section,
            space=builder.space,
            base_dir=builder.base_dir,
            cap=builder.cap,
            max_epochs_key=builder.max_epochs_key,
            weights_attribute=builder.weights_attribute,
            reads_weights=builder.reads_weights,
            monitor=monitor,
        )

    def __call__(self) -> InProcessExecutor:
        """Build the CLI (``run=False``), its trial builder and the in-process executor.

        Raises:
            FMSError: the config does not parse here (the message names the worker's problem).
        """
        try:
            cli = self.cli_class(*self.init_args, **self.init_kwargs, args=copy.deepcopy(self.config), run=False)
        except SystemExit as error:  # jsonargparse exits on what it cannot parse
            raise FMSError(f"the Ray worker cannot parse the study's config again (exit {error.code})") from None
        builder = CLITrialBuilder(
            cli,
            self.space,
            self.base_dir,
            cap=self.cap,
            max_epochs_key=self.max_epochs_key,
            weights_attribute=self.weights_attribute,
            reads_weights=self.reads_weights,
        )
        return InProcessExecutor(
            builder, monitor=self.monitor, hub=builder.hub, weights_attribute=self.weights_attribute
        )


def _options_from_namespace(namespace: Namespace) -> TunerOptions:
    values = namespace.as_dict()
    values["wandb"] = WandbOptions(**(values.get("wandb") or {}))
    values["ray"] = RayOptions(**(values.get("ray") or {}))
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
