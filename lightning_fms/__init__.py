"""lightning_fms: Forecasting Model Search for PyTorch Lightning.

Freeze-thaw hyperparameter and model-hub search: trains many fine-tuning candidates one epoch at a
time and lets a deep-kernel Gaussian process (which can also read the checkpointed weights) decide
which one gets the next epoch.

Every public name is importable from here and is loaded on first use, so ``import lightning_fms`` stays
cheap: it imports no CLI parser, W&B, rich or plotting code. The layers, from the bottom up:

* :mod:`lightning_fms.search` — space, trials, row alignment, the freeze-thaw optimizer, searchers (no Lightning);
* :mod:`lightning_fms.surrogate` and :mod:`lightning_fms.weights` — the GP surrogates and checkpoint featurizers;
* :mod:`lightning_fms.frozen` — layer units and the frozen-layer fidelity;
* :mod:`lightning_fms.training` — where an epoch runs (executor, callback, trial seeder);
* :mod:`lightning_fms.study` — the study directory, its ledger, snapshots and reports;
* the front ends: :mod:`~lightning_fms.tuner`, :mod:`~lightning_fms.agent`, :mod:`~lightning_fms.recipe`,
  :mod:`~lightning_fms.cli`, :mod:`~lightning_fms.lightning_cli`;
* :mod:`lightning_fms.transfer` — priors learned from earlier studies (``pretrain``, ``load_prior``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_fms.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "CategoricalParam": "lightning_fms.search.space",
    "FloatParam": "lightning_fms.search.space",
    "HubChoice": "lightning_fms.search.space",
    "IntParam": "lightning_fms.search.space",
    "SearchSpace": "lightning_fms.search.space",
    "Trial": "lightning_fms.search.trial",
    "TrialStatus": "lightning_fms.search.trial",
    "FreezeThawOptimizer": "lightning_fms.search.optimizer",
    "Observation": "lightning_fms.search.optimizer",
    "Suggestion": "lightning_fms.search.optimizer",
    "SuggestionKind": "lightning_fms.search.optimizer",
    "RandomSearcher": "lightning_fms.search.searcher",
    "Searcher": "lightning_fms.search.searcher",
    "SurrogateSearcher": "lightning_fms.search.searcher",
    "build_searcher": "lightning_fms.search.searcher",
    "CheckpointError": "lightning_fms.errors",
    "FMSError": "lightning_fms.errors",
    "StudyLockedError": "lightning_fms.errors",
    "EpochJob": "lightning_fms.training.executor",
    "EpochOutcome": "lightning_fms.training.executor",
    "Executor": "lightning_fms.training.executor",
    "InProcessExecutor": "lightning_fms.training.in_process",
    "EpochReport": "lightning_fms.training.callback",
    "FMSCheckpointCallback": "lightning_fms.training.callback",
    "TrialSeeder": "lightning_fms.training.seeder",
    "FrozenLayers": "lightning_fms.frozen.levels",
    "FrozenUnits": "lightning_fms.frozen.callback",
    "LayerUnit": "lightning_fms.frozen.units",
    "layer_units": "lightning_fms.frozen.units",
    "set_trainable_units": "lightning_fms.frozen.units",
    "trainable_fraction": "lightning_fms.frozen.units",
    "HubEntry": "lightning_fms.hub",
    "ModelHub": "lightning_fms.hub",
    "load_weights_file": "lightning_fms.hub",
    "FMSTuner": "lightning_fms.tuner",
    "TuneResult": "lightning_fms.tuner",
    "load_best_weights": "lightning_fms.tuner",
    "StudyObserver": "lightning_fms.observer",
    "StudyView": "lightning_fms.observer",
    "Recipe": "lightning_fms.recipe",
    "read_space_file": "lightning_fms.sweep",
    "space_from_sweep": "lightning_fms.sweep",
    "FMSLightningCLI": "lightning_fms.lightning_cli",
    "StudyOptions": "lightning_fms.options",
    "TunerOptions": "lightning_fms.options",
    "WandbOptions": "lightning_fms.options",
    "WandbStudyLogger": "lightning_fms.loggers",
    "Prior": "lightning_fms.transfer.prior",
    "PriorError": "lightning_fms.transfer.prior",
    "load_prior": "lightning_fms.transfer.prior",
    "PretrainOptions": "lightning_fms.transfer.pretrain",
    "PretrainResult": "lightning_fms.transfer.pretrain",
    "pretrain": "lightning_fms.transfer.pretrain",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from lightning_fms.errors import CheckpointError, FMSError, StudyLockedError
    from lightning_fms.frozen.callback import FrozenUnits
    from lightning_fms.frozen.levels import FrozenLayers
    from lightning_fms.frozen.units import LayerUnit, layer_units, set_trainable_units, trainable_fraction
    from lightning_fms.hub import HubEntry, ModelHub, load_weights_file
    from lightning_fms.lightning_cli import FMSLightningCLI
    from lightning_fms.loggers import WandbStudyLogger
    from lightning_fms.observer import StudyObserver, StudyView
    from lightning_fms.options import StudyOptions, TunerOptions, WandbOptions
    from lightning_fms.recipe import Recipe
    from lightning_fms.search.optimizer import FreezeThawOptimizer, Observation, Suggestion, SuggestionKind
    from lightning_fms.search.searcher import RandomSearcher, Searcher, SurrogateSearcher, build_searcher
    from lightning_fms.search.space import CategoricalParam, FloatParam, HubChoice, IntParam, SearchSpace
    from lightning_fms.search.trial import Trial, TrialStatus
    from lightning_fms.sweep import read_space_file, space_from_sweep
    from lightning_fms.training.callback import EpochReport, FMSCheckpointCallback
    from lightning_fms.training.executor import EpochJob, EpochOutcome, Executor
    from lightning_fms.training.in_process import InProcessExecutor
    from lightning_fms.training.seeder import TrialSeeder
    from lightning_fms.transfer.pretrain import PretrainOptions, PretrainResult, pretrain
    from lightning_fms.transfer.prior import Prior, PriorError, load_prior
    from lightning_fms.tuner import FMSTuner, TuneResult, load_best_weights
