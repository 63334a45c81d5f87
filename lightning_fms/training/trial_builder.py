"""Trial builders: how a configuration becomes the objects one fit trains.

A trial builder is a callable ``builder(config, trial_dir) -> BuiltTrial``. The in-process executor calls it
once per epoch, after seeding the global generators, so the objects it returns are the same every time a
trial starts. Two builders ship:

* :class:`FactoryTrialBuilder` calls a module factory and a datamodule factory with the configuration's values
  (what :class:`~lightning_fms.tuner.FMSTuner` and recipes use);
* ``CLITrialBuilder`` (:mod:`lightning_fms.cli_trials`) parses and instantiates each trial through a
  ``LightningCLI``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import torch

from lightning_fms.errors import FMSError
from lightning_fms.hub import ModelHub
from lightning_fms.search.space import SearchSpace
from lightning_fms.training.trainer import check_trainer_options

#: The module argument that receives the pretrained hub module, unless a recipe or ``FMSTuner`` names another.
DEFAULT_HUB_ARGUMENT = "net"
#: The module argument that receives the per-trial epoch cap, unless a recipe or ``FMSTuner`` names another.
DEFAULT_EPOCHS_ARGUMENT = "max_epochs"


@dataclass
class BuiltTrial:
    """What one fit of a trial trains.

    Attributes:
        module: The LightningModule (a fresh instance, with the pretrained weights of its hub entry).
        datamodule: Its LightningDataModule (``None`` when the module brings its own loaders).
        trainer_options: ``Trainer`` arguments of this trial (accelerator, precision, limits, ...), none of
            :data:`~lightning_fms.training.trainer.TUNER_TRAINER_KEYS`.
    """

    module: pl.LightningModule
    datamodule: pl.LightningDataModule | None
    trainer_options: dict[str, Any] = field(default_factory=dict)


class TrialBuilder(Protocol):
    """Builds the objects of one trial from its configuration."""

    def __call__(self, config: Mapping[str, Any], trial_dir: Path | None = None, cap: int | None = None) -> BuiltTrial:
        """Build a trial.

        Args:
            config: The trial's configuration.
            trial_dir: The trial's folder when the build is for one of its epochs (a builder may keep files
                there, e.g. the trial's config); ``None`` for other builds (cost model, checks).
            cap: The study's per-trial epoch cap (the LR-schedule horizon) when the build is for one of its
                epochs (:attr:`~lightning_fms.training.executor.EpochJob.cap`); ``None``: the builder's own,
                if it has one (see :func:`trial_cap`).

        Raises:
            FMSError: the configuration cannot be built (a set-up problem).
        """
        ...


class FactoryTrialBuilder:
    """Builds trials by calling a module factory and a datamodule factory.

    The module receives ``module_options``, then the space's ``model.*`` values, the hub entry's pretrained
    network as ``hub_argument`` and the trial's cap (:func:`trial_cap`) as ``epochs_argument`` (if it accepts it);
    the datamodule receives ``datamodule_options``, then the space's ``data.*`` values.

    Args:
        module_factory: Builds the LightningModule from keyword arguments (a class or a function).
        datamodule_factory: Builds the LightningDataModule from keyword arguments.
        space: The search space (splits a configuration into hub entry, module and data arguments).
        hub: The model hub, or ``None`` when the space has no hub choice.
        cap: The per-trial epoch cap of builds outside a study's jobs (cost model, benchmark pools);
            ``None``: only a job's cap is passed. Given, a job with another cap is refused.
        hub_argument: Name of the module argument that receives the pretrained hub module.
        epochs_argument: Name of the module argument that receives the cap (LR schedule horizon); ``""``: none.
        module_options: Fixed module arguments (the space's values override them).
        datamodule_options: Fixed datamodule arguments (the space's values override them).
        trainer_options: ``Trainer`` arguments of every trial.

    Raises:
        FMSError: ``trainer_options`` sets what the tuner sets, or the space has a hub choice but no hub is given.
    """

    def __init__(
        self,
        module_factory: Callable[..., pl.LightningModule],
        datamodule_factory: Callable[..., pl.LightningDataModule],
        space: SearchSpace,
        hub: ModelHub | None,
        cap: int | None = None,
        hub_argument: str = DEFAULT_HUB_ARGUMENT,
        epochs_argument: str = DEFAULT_EPOCHS_ARGUMENT,
        module_options: Mapping[str, Any] | None = None,
        datamodule_options: Mapping[str, Any] | None = None,
        trainer_options: Mapping[str, Any] | None = None,
    ) -> None:
        check_trainer_options(trainer_options or {})
        if space.hub_key is not None and hub is None:
            raise FMSError(f"the space has a hub choice {space.hub_key!r} but no model hub was given")
        self.module_factory = module_factory
        self.datamodule_factory = datamodule_factory
        self.space = space
        self.hub = hub
        self.cap = cap
        self.hub_argument = hub_argument
        self.epochs_argument = epochs_argument
        self.module_options = dict(module_options or {})
        self.datamodule_options = dict(datamodule_options or {})
        self.trainer_options = dict(trainer_options or {})

    def __call__(self, config: Mapping[str, Any], trial_dir: Path | None = None, cap: int | None = None) -> BuiltTrial:
        """Call the factories with the configuration's values and the trial's cap (``trial_dir`` is not used).

        Raises:
            FMSError: the factories reject the arguments (a space key that is not an argument, ...), or
                ``cap`` contradicts the builder's own.
        """
        cap = trial_cap(self.cap, cap)
        entry, model_args, data_args = self.space.split(dict(config))
        kwargs = {**self.module_options, **model_args}
        if self.hub is not None and entry is not None:
            kwargs[self.hub_argument] = self.hub.build(str(entry))
        if cap is not None and self.epochs_argument and accepts_argument(self.module_factory, self.epochs_argument):
            kwargs.setdefault(self.epochs_argument, cap)
        module = _call(self.module_factory, kwargs, "module")
        datamodule = _call(self.datamodule_factory, {**self.datamodule_options, **data_args}, "datamodule")
        return BuiltTrial(module, datamodule, dict(self.trainer_options))


def trial_cap(own: int | None, job: int | None) -> int | None:
    """The cap a trial is built with: the job's when given (it must agree with the builder's own), else the own.

    Args:
        own: The cap the builder was built with (``None``: none).
        job: The cap of the job the build is for (``None``: the build is for no job).

    Raises:
        FMSError: both are given and differ (the LR-schedule horizon would silently change).
    """
    if job is None:
        return own
    if own is not None and int(job) != int(own):
        raise FMSError(
            f"the study's per-trial cap is {job} but the trial builder was built with cap={own} (give one cap)"
        )
    return int(job)


def accepts_argument(factory: Callable[..., Any], name: str, unknown: bool = False) -> bool:
    """Whether ``factory(**{name: ...})`` is a valid call; ``unknown`` when its signature cannot be read."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return unknown
    return name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def _call(factory: Callable[..., Any], kwargs: dict[str, Any], what: str) -> Any:
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as error:
        shown = {k: v for k, v in kwargs.items() if not isinstance(v, torch.nn.Module)}
        raise FMSError(
            f"cannot build the {what} {getattr(factory, '__name__', factory)} with {shown}: {error}"
        ) from None
    except ValueError:
        pass
    return factory(**kwargs)
