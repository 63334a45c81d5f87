"""The search layer: space, trials, row alignment, the freeze-thaw optimizer and its searchers.

Nothing here imports Lightning (a test imports this package with ``lightning`` blocked): the ask/tell loop
can drive any training code.
"""

from lightning_fms.search.optimizer import FreezeThawOptimizer, Observation, Suggestion, SuggestionKind
from lightning_fms.search.searcher import RandomSearcher, Searcher, SurrogateSearcher, build_searcher
from lightning_fms.search.space import CategoricalParam, FloatParam, HubChoice, IntParam, SearchSpace
from lightning_fms.search.trial import Trial, TrialStatus

__all__ = [
    "CategoricalParam",
    "FloatParam",
    "FreezeThawOptimizer",
    "HubChoice",
    "IntParam",
    "Observation",
    "RandomSearcher",
    "SearchSpace",
    "Searcher",
    "Suggestion",
    "SuggestionKind",
    "SurrogateSearcher",
    "Trial",
    "TrialStatus",
    "build_searcher",
]
