"""lightning_fms: Forecasting Model Search for PyTorch Lightning.

Freeze-thaw hyperparameter and model-hub search: trains many fine-tuning candidates one epoch at a
time and lets a deep-kernel Gaussian process (which can also read the checkpointed weights) decide
which one gets the next epoch.
"""

from lightning_fms.callback import EpochReport, FMSCheckpointCallback
from lightning_fms.errors import CheckpointError, FMSError, StudyLockedError
from lightning_fms.fidelity import FrozenUnits, LayerUnit, layer_units, set_trainable_units, trainable_fraction
from lightning_fms.frozen_layers import FrozenLayers
from lightning_fms.hub import HubEntry, ModelHub, load_weights_file
from lightning_fms.lightning_cli import FMSLightningCLI, TunerOptions, WandbOptions
from lightning_fms.loggers import WandbStudyLogger
from lightning_fms.observer import StudyObserver
from lightning_fms.recipe import Recipe
from lightning_fms.scheduler import FreezeThawOptimizer, Observation, Suggestion, SuggestionKind
from lightning_fms.searcher import RandomSearcher, Searcher, SurrogateSearcher, build_searcher
from lightning_fms.seeding import TrialSeeder
from lightning_fms.space import CategoricalParam, FloatParam, HubChoice, IntParam, SearchSpace
from lightning_fms.sweep import read_space_file, space_from_sweep
from lightning_fms.trial import Trial, TrialStatus
from lightning_fms.tuner import FMSTuner, TuneResult, load_best_weights

__version__ = "0.1.0"

__all__ = [
    "CategoricalParam",
    "CheckpointError",
    "EpochReport",
    "FMSCheckpointCallback",
    "FMSError",
    "FMSTuner",
    "FloatParam",
    "FreezeThawOptimizer",
    "HubChoice",
    "HubEntry",
    "IntParam",
    "ModelHub",
    "Observation",
    "RandomSearcher",
    "Recipe",
    "SearchSpace",
    "Searcher",
    "StudyLockedError",
    "StudyObserver",
    "Suggestion",
    "SuggestionKind",
    "SurrogateSearcher",
    "Trial",
    "TrialSeeder",
    "TrialStatus",
    "TuneResult",
    "build_searcher",
    "load_best_weights",
    "load_weights_file",
    "FMSLightningCLI",
    "TunerOptions",
    "WandbOptions",
    "WandbStudyLogger",
    "read_space_file",
    "space_from_sweep",
    "FrozenLayers",
    "FrozenUnits",
    "LayerUnit",
    "layer_units",
    "set_trainable_units",
    "trainable_fraction",
]
