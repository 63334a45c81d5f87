"""Searchers decide *what* gets the next epoch; the optimizer decides *when* and keeps the books.

* :class:`SurrogateSearcher`: fit a surrogate on every observed (trial, epoch), score each candidate
  with multi-fidelity expected improvement (the incumbent taken at the candidate's own epoch), pick
  the best (or, with a probability, promote the best paused trial of the highest rung). With the default
  additive GP (``"fms"``) the surrogate reads curve and weight features beside the plain GP's inputs; with the
  deep-kernel surrogate and no featurizer this is DyHPO, with a featurizer the paper's FMS.
* :class:`RandomSearcher`: random search as users know it: one configuration at a time, trained to
  the per-trial cap, then the next.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_fms.errors import FMSError
from lightning_fms.search.pending import DEFAULT_FANTASIES, DEFAULT_PENDING, check_pending, pending_targets
from lightning_fms.search.posterior_cache import PosteriorCache
from lightning_fms.search.promotion import promotion_index
from lightning_fms.search.row_cap import DEFAULT_MAX_ROWS, cap_rows
from lightning_fms.search.rows import Candidate, ModuleProvider, RowSpec, candidate_specs, encode_rows, training_specs
from lightning_fms.search.seeds import derive_seed, seed_everything_quietly
from lightning_fms.search.space import SearchSpace
from lightning_fms.search.trial import Trial
from lightning_fms.surrogate import SURROGATES, Surrogate, budget_incumbents, build_surrogate, expected_improvement
from lightning_fms.threads import torch_threads

#: Names accepted by :func:`build_searcher` (the one list the recipe, the flags and the benchmark read): a
#: surrogate searcher per surrogate, and random search.
SEARCHERS: tuple[str, ...] = (*SURROGATES, "random")
#: The searchers a prior (``lightning-fms pretrain``) can be learned for and applied to.
PRIOR_SEARCHERS: tuple[str, ...] = ("fms", "dyhpo")
#: Learning-curve encoders of the surrogate searchers (``build_searcher(curve=...)``).
CURVE_ENCODERS: tuple[str, ...] = ("cnn", "none")
#: The ``weights`` value that picks the featurizer for the searcher and space (see :func:`resolve_weights`).
AUTO_WEIGHTS = "auto"
#: What ``weights="auto"`` gives the library default searcher when the space has a hub choice.
AUTO_FEATURIZER = "summary"
#: Probability of a promotion decision (see :mod:`lightning_fms.search.promotion`) per searcher by default: the
#: paper's DyHPO/FMS and the plain GP as published (0); the library default ``fms`` as chosen by the benchmark.
DEFAULT_PROMOTION_PROBABILITY: dict[str, float] = {"fms": 0.25, "dyhpo": 0.0, "gp": 0.0}


@dataclass
class SelectionContext:
    """What a searcher may look at when choosing.

    Attributes:
        space: The search space.
        trials: Every trial so far, by id.
        mode: ``"max"`` or ``"min"``.
        cap: The per-trial epoch cap.
        modules: Builds the module (architecture + weights) for a weight key, or ``None`` when the
            study records no weights.
        frozen_layers: Whether the frozen-layer fidelity is on: rows carry the trainable fraction as an
            extra input column, incumbents are per (epoch, fraction), and expected improvement is divided
            by each candidate's cost.
        pending: One row per epoch running on another worker now (:mod:`lightning_fms.search.pending`); empty
            when one epoch runs at a time.
    """

    space: SearchSpace
    trials: dict[int, Trial]
    mode: str
    cap: int
    modules: ModuleProvider | None = None
    frozen_layers: bool = False
    pending: tuple[RowSpec, ...] = ()


@dataclass
class FitPlan:
    """The fits one decision asks for: the same rows, one target vector per fit (several with fantasies).

    Attributes:
        rows: ``N + P`` encoded rows: the ``N`` observed (after the row cap), then the ``P`` pending ones.
        targets: ``K`` target vectors, each ``[N + P]`` (observed scores, then the pending rows' made-up ones).
        seeds: The seed of each of the ``K`` fits.
    """

    rows: Any
    targets: list[torch.Tensor]
    seeds: list[int]


@dataclass
class Selection:
    """The chosen candidate and how it was chosen.

    Attributes:
        index: Position in the candidate list.
        info: Acquisition value, predicted mean and standard deviation, surrogate seconds, ...
    """

    index: int
    info: dict[str, float] = field(default_factory=dict)


class Searcher(ABC):
    """Chooses one candidate. Deterministic given the context, the candidates, the seed and its state."""

    uses_weights: bool = False
    prior_fingerprint: str | None = None
    """The fingerprint of the prior its surrogate's fits start from (``None``: none); a study records it."""

    @abstractmethod
    def select(self, context: SelectionContext, candidates: Sequence[Candidate], seed: int) -> Selection:
        """Pick one of ``candidates`` (never empty)."""

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (tensors, lists, dicts and scalars only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (stateless searchers keep this no-op)
        """Restore :meth:`state_dict`."""


class SurrogateSearcher(Searcher):
    """Multi-fidelity expected improvement over a surrogate's posterior.

    Args:
        surrogate: Any :class:`~lightning_fms.surrogate.Surrogate`.
        uses_weights: Whether rows carry weight modules (true when the surrogate has a featurizer).
        min_rows: Below this many observed rows the first candidate (a random fresh configuration) is taken.
        cpu_threads: torch intra-op threads while the surrogate works on the CPU. The GP and its
            feature extractor are small: on this project's 2-core machine one thread was 10-20x faster
            than two whenever another process competed for the cores. ``None`` leaves torch's setting.
        max_rows: Cap on the training rows (:func:`~lightning_fms.search.row_cap.cap_rows`); ``None``: no cap.
        promotion_probability: Per decision, the probability of continuing the best paused trial of the
            highest rung without consulting the surrogate (:mod:`lightning_fms.search.promotion`).
        hide_hub: Hide which hub entry a configuration starts from (its encoded columns are zero in every
            row): the paper's setting, where only the weights tell the models apart.
        prior_fingerprint: The fingerprint of the prior applied to ``surrogate`` (``None``: none), recorded in
            the study's settings so that a study is never resumed with another prior.
        pending: How epochs running on other workers enter the fit, one of
            :data:`~lightning_fms.search.pending.PENDING_STRATEGIES`.
        fantasies: Posterior draws of the ``"fantasies"`` strategy (one fit each).
    """

    def __init__(
        self,
        surrogate: Surrogate,
        uses_weights: bool = False,
        min_rows: int = 2,
        cpu_threads: int | None = 1,
        max_rows: int | None = DEFAULT_MAX_ROWS,
        promotion_probability: float = 0.0,
        hide_hub: bool = False,
        prior_fingerprint: str | None = None,
        pending: str = DEFAULT_PENDING,
        fantasies: int = DEFAULT_FANTASIES,
    ) -> None:
        check_pending(pending, fantasies)
        if not 0.0 <= float(promotion_probability) <= 1.0:
            raise FMSError(f"promotion_probability must be in [0, 1], got {promotion_probability!r}")
        if max_rows is not None and int(max_rows) < 2:
            raise FMSError(f"max_rows must be at least 2 (or None), got {max_rows!r}")
        self.surrogate = surrogate
        self.uses_weights = uses_weights
        self.min_rows = min_rows
        self.cpu_threads = cpu_threads
        self.max_rows = None if max_rows is None else int(max_rows)
        self.promotion_probability = float(promotion_probability)
        self.hide_hub = bool(hide_hub)
        self.prior_fingerprint = prior_fingerprint
        self.pending = pending
        self.fantasies = int(fantasies)
        self._posteriors = PosteriorCache()  # decisions with the current fit score each candidate row once

    def _encode(self, context: SelectionContext, specs: Sequence[RowSpec]) -> Any:
        """Encode rows for the surrogate (hub columns zeroed when the hub is hidden)."""
        modules = context.modules if self.uses_weights else None
        rows = encode_rows(context.space, specs, context.cap, modules, fraction_feature=context.frozen_layers)
        if self.hide_hub and context.space.hub_key is not None:
            start = 0
            for name in context.space:
                if name == context.space.hub_key:
                    break
                start += context.space[name].dim
            rows.x[:, start : start + context.space[context.space.hub_key].dim] = 0.0
        return rows

    def select(self, context: SelectionContext, candidates: Sequence[Candidate], seed: int) -> Selection:
        """Fit on all observations (and the pending epochs), then maximise expected improvement over ``candidates``."""
        return self._select(context, candidates, seed, refit=True)

    def select_with_current_fit(
        self, context: SelectionContext, candidates: Sequence[Candidate], seed: int
    ) -> Selection:
        """Like :meth:`select`, but score with the surrogate as last fitted (no fit; for decisions while it refits).

        Falls back to :meth:`select` while the surrogate has never been fitted.
        """
        return self._select(context, candidates, seed, refit=not self.has_fit)

    @property
    def has_fit(self) -> bool:
        """Whether the surrogate has been fitted at least once (its posterior is more than the prior)."""
        return int(getattr(self.surrogate, "num_fits", 1)) > 0

    def fit_plan(self, context: SelectionContext, seed: int) -> FitPlan | None:
        """The rows and targets of this decision's fits (``None``: too few observations to fit).

        Observed rows are capped (:func:`~lightning_fms.search.row_cap.cap_rows`); pending rows follow with the
        targets of :attr:`pending` (:func:`~lightning_fms.search.pending.pending_targets`).
        """
        specs, targets = training_specs(context.space, list(context.trials.values()), context.mode)
        if len(specs) < self.min_rows:
            return None
        keep = cap_rows(specs, self.max_rows, derive_seed(seed, "row cap"))
        fit_specs = [specs[i] for i in keep]
        fit_targets = [targets[i] for i in keep]
        pending = list(context.pending) if self.pending != "ignore" else []
        with torch_threads(self.cpu_threads):
            lies: list[list[float]] = [[]]
            if pending:
                previous = None
                if self.has_fit:
                    pending_rows = self._encode(context, pending)
                    previous = lambda: self.surrogate.posterior(pending_rows)  # noqa: E731
                lies = pending_targets(
                    self.pending, fit_targets, len(pending), previous, derive_seed(seed, "fantasies"), self.fantasies
                )
            rows = self._encode(context, fit_specs + pending)
        seeds = [seed] + [derive_seed(seed, "fantasy", k) for k in range(1, len(lies))]
        return FitPlan(rows, [torch.tensor(fit_targets + lie, dtype=torch.float32) for lie in lies], seeds)

    def fit_surrogate(self, surrogate: Surrogate, plan: FitPlan) -> Surrogate:
        """Fit ``surrogate`` (a copy of :attr:`surrogate`) on ``plan``'s first target vector; returns it.

        For a fit off the decision path (another thread): the searcher's own surrogate is not touched, so
        decisions may go on with it until :meth:`adopt` swaps the fitted copy in.
        """
        with torch_threads(self.cpu_threads):
            surrogate.fit(plan.rows, plan.targets[0], plan.seeds[0])
        return surrogate

    def adopt(self, surrogate: Surrogate) -> None:
        """Decide with ``surrogate`` from now on (one returned by :meth:`fitted_copy`)."""
        self.surrogate = surrogate
        self._posteriors.clear()

    def _select(self, context: SelectionContext, candidates: Sequence[Candidate], seed: int, refit: bool) -> Selection:
        specs, targets = training_specs(context.space, list(context.trials.values()), context.mode)
        if len(specs) < self.min_rows:
            return Selection(index=0, info={"surrogate_s": 0.0})
        if self.promotion_probability > 0:
            draw = np.random.default_rng(derive_seed(seed, "promotion")).random()
            promoted = None
            if draw < self.promotion_probability:
                promoted = promotion_index(candidates, context.trials, context.mode)
            if promoted is not None:
                return Selection(index=promoted, info={"surrogate_s": 0.0, "promotion": 1.0})
        two_d = context.frozen_layers
        start = time.perf_counter()

        def score(positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            chosen = [candidates[i] for i in positions]
            rows = self._encode(context, candidate_specs(context.space, chosen, context.trials, context.mode))
            return self.surrogate.posterior(rows)

        plan = self.fit_plan(context, seed) if refit else None
        posteriors = []
        with torch_threads(self.cpu_threads):
            if plan is None:  # the current fit: only the candidates it has not scored yet
                posteriors.append(self._posteriors.posterior(self.surrogate, candidates, score))
            else:
                self._posteriors.clear()
                cand_rows = None
                for targets_k, seed_k in zip(plan.targets, plan.seeds, strict=True):
                    self.surrogate.fit(plan.rows, targets_k, seed_k)
                    if cand_rows is None:
                        cand_specs = candidate_specs(context.space, candidates, context.trials, context.mode)
                        cand_rows = self._encode(context, cand_specs)
                    posteriors.append(self.surrogate.posterior(cand_rows))
        incumbents = budget_incumbents(
            torch.tensor([_fidelity_id(s.epoch, s.fraction, two_d) for s in specs], dtype=torch.long),
            torch.tensor(targets, dtype=torch.float64),
            torch.tensor([_fidelity_id(c.epoch, c.fraction, two_d) for c in candidates], dtype=torch.long),
        )
        ei = sum(expected_improvement(m.double(), v.double(), incumbents) for m, v in posteriors) / len(posteriors)
        if two_d:  # improvement per full-epoch equivalent spent
            ei = ei / torch.tensor([c.cost for c in candidates], dtype=torch.float64).clamp_min(1e-6)
        index = int(torch.argmax(ei))
        mean, variance = posteriors[0]
        info = {
            "acquisition": float(ei[index]),
            "predicted_mean": float(mean[index]),
            "predicted_std": float(variance[index].clamp_min(0).sqrt()),
            "surrogate_s": time.perf_counter() - start,
        }
        if context.pending and self.pending != "ignore":
            info["pending"] = float(len(context.pending))
        if not refit:
            info["current_fit"] = 1.0
        return Selection(index=index, info=info)

    def predict(self, context: SelectionContext, specs: Sequence[RowSpec]) -> tuple[torch.Tensor, torch.Tensor]:
        """The fitted surrogate's posterior for rows (no refit; call after at least one :meth:`select` that fit).

        Args:
            context: As for :meth:`select`.
            specs: ``M`` rows to predict.

        Returns:
            ``(mean, variance)``, each ``[M]``, in score units (larger is better).
        """
        with torch_threads(self.cpu_threads):
            return self.surrogate.posterior(self._encode(context, specs))

    def state_dict(self) -> dict[str, Any]:
        """The surrogate's state."""
        return {"surrogate": self.surrogate.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the surrogate's state."""
        self._posteriors.clear()
        if "surrogate" in state:
            self.surrogate.load_state_dict(state["surrogate"])


def _fidelity_id(epoch: int, fraction: float, two_d: bool) -> int:
    """Integer id of a fidelity: the epoch, or with the frozen-layer fidelity the pair (epoch, fraction)."""
    return epoch * 10_000 + round(fraction * 9_999) if two_d else epoch


class RandomSearcher(Searcher):
    """Random search: continue the most recently started trial until it finishes, else start a fresh one."""

    def select(self, context: SelectionContext, candidates: Sequence[Candidate], seed: int) -> Selection:
        """Prefer the newest resumable trial; otherwise the first (random) fresh configuration; always fully trained."""
        resumable = [i for i, c in enumerate(candidates) if c.trial_id is not None]
        if resumable:
            index = max(resumable, key=lambda i: (candidates[i].trial_id or 0, candidates[i].fraction))
            return Selection(index=index, info={"surrogate_s": 0.0})
        fresh = [i for i, c in enumerate(candidates) if c.trial_id is None]
        first = candidates[fresh[0]].config
        index = max((i for i in fresh if candidates[i].config == first), key=lambda i: candidates[i].fraction)
        return Selection(index=index, info={"surrogate_s": 0.0})


def resolve_weights(name: str, space: SearchSpace, weights: str) -> str:
    """The featurizer a searcher gets: ``weights`` itself, or for ``"auto"`` the searcher's and space's default.

    ``"auto"`` means :data:`AUTO_FEATURIZER` for the library default searcher ``"fms"`` when the space has a hub
    choice (weights need a hub entry to start from), and ``"none"`` otherwise (the paper's DyHPO reads no
    weights; the plain GP and random search cannot).
    """
    if weights != AUTO_WEIGHTS:
        return weights
    return AUTO_FEATURIZER if name == "fms" and space.hub_key is not None else "none"


def build_searcher(
    name: str,
    space: SearchSpace,
    cap: int,
    *,
    weights: str = "none",
    curve: str = "cnn",
    device: str | None = None,
    surrogate_options: dict[str, Any] | None = None,
    featurizer_options: dict[str, Any] | None = None,
    frozen_layers: bool = False,
    hide_hub: bool = False,
    promotion_probability: float | None = None,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    prior: Any = None,
    pending: str = DEFAULT_PENDING,
    fantasies: int = DEFAULT_FANTASIES,
) -> Searcher:
    """Build a searcher by name.

    Args:
        name: One of :data:`SEARCHERS`: ``"fms"`` (the plain GP's kernel plus curve and weight kernels, the
            library default), ``"dyhpo"`` (deep-kernel GP; the paper's FMS when ``weights`` is not ``"none"``),
            ``"gp"`` (plain GP on hyperparameters and budget) or ``"random"``.
        space: The search space.
        cap: The per-trial epoch cap.
        weights: Checkpoint featurizer: ``"none"``, ``"auto"`` (:func:`resolve_weights`) or a name known to
            :func:`lightning_fms.weights.build_featurizer` (``"fms"`` and ``"dyhpo"`` read weights).
        curve: One of :data:`CURVE_ENCODERS`: ``"cnn"`` (learning-curve encoder) or ``"none"``.
        device: Surrogate device; ``None`` picks CUDA when present.
        surrogate_options: Extra keyword arguments for the surrogate.
        featurizer_options: Extra keyword arguments for the featurizer.
        frozen_layers: Give the surrogate one more input column, the trainable fraction of layer units.
        hide_hub: Hide the hub entry from the surrogate (see :class:`SurrogateSearcher`).
        promotion_probability: Probability of a promotion decision; ``None``: the searcher's default
            (:data:`DEFAULT_PROMOTION_PROBABILITY`).
        max_rows: Cap on the surrogate's training rows (``None``: no cap).
        prior: A prior written by ``lightning-fms pretrain``: a path, or a
            :class:`~lightning_fms.transfer.prior.Prior` (not annotated as one: ``transfer/`` is a higher layer,
            imported only when a prior is given). It is checked to fit this searcher and space, then every
            fresh surrogate fit starts from it (:mod:`lightning_fms.transfer.apply`). Only for
            :data:`PRIOR_SEARCHERS`.
        pending: How epochs running on other workers enter a fit (:mod:`lightning_fms.search.pending`).
        fantasies: Posterior draws of ``pending="fantasies"``.

    Raises:
        FMSError: an unknown name or option; a prior that cannot be read or does not fit
            (:class:`~lightning_fms.transfer.prior.PriorError`).
    """
    if name not in SEARCHERS:
        raise FMSError(f"unknown searcher {name!r} (expected one of {', '.join(SEARCHERS)})")
    if curve not in CURVE_ENCODERS:
        raise FMSError(f"unknown curve encoder {curve!r} (expected one of {', '.join(CURVE_ENCODERS)})")
    if prior is not None and name not in PRIOR_SEARCHERS:
        raise FMSError(f"a prior is for the {' or '.join(PRIOR_SEARCHERS)} searcher, not {name!r}")
    check_pending(pending, fantasies)
    if name == "random":
        return RandomSearcher()
    weights = resolve_weights(name, space, weights)
    if weights != "none" and name not in ("fms", "dyhpo"):
        raise FMSError(f"weights={weights!r} needs a searcher that reads weights ('fms' or 'dyhpo'), not {name!r}")
    if prior is not None:
        # transfer/ sits above search/ (pretraining reads the front ends' option declaration): imported here
        from lightning_fms.transfer.prior import Prior, check_prior_fits, load_prior

        prior = prior if isinstance(prior, Prior) else load_prior(prior)
        check_prior_fits(prior, searcher=name, weights=weights, curve=curve, frozen_layers=frozen_layers, space=space)
    featurizer = None
    if weights != "none":
        from lightning_fms.weights import build_featurizer

        featurizer = build_featurizer(weights, **(featurizer_options or {}))
    if prior is not None:
        from lightning_fms.transfer.apply import prior_featurizer

        featurizer = prior_featurizer(prior, featurizer)
    surrogate = build_surrogate(
        name,
        x_dim=space.dim + (1 if frozen_layers else 0),
        curve_length=cap,
        featurizer=featurizer,
        use_curve=curve == "cnn",
        device=device,
        **(surrogate_options or {}),
    )
    if prior is not None:
        from lightning_fms.transfer.apply import apply_prior

        apply_prior(prior, surrogate, space, frozen_layers)
    probability = promotion_probability
    if probability is None:
        probability = DEFAULT_PROMOTION_PROBABILITY.get(name, 0.0)
    return SurrogateSearcher(
        surrogate,
        uses_weights=featurizer is not None,
        max_rows=max_rows,
        promotion_probability=probability,
        hide_hub=hide_hub,
        prior_fingerprint=prior.fingerprint if prior is not None else None,
        pending=pending,
        fantasies=fantasies,
    )


def seeded_searcher(
    name: str,
    space: SearchSpace,
    cap: int,
    *,
    seed: int,
    modules: ModuleProvider | None = None,
    weights: str = "none",
    curve: str = "cnn",
    device: str | None = None,
    surrogate_options: dict[str, Any] | None = None,
    featurizer_options: dict[str, Any] | None = None,
    frozen_layers: bool = False,
    hide_hub: bool = False,
    promotion_probability: float | None = None,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    prior: Any = None,
    pending: str = DEFAULT_PENDING,
    fantasies: int = DEFAULT_FANTASIES,
) -> Searcher:
    """:func:`build_searcher` whose initial parameters depend on ``seed`` only, its featurizer warmed up.

    The searcher is built under a forked torch generator seeded with ``seed`` (Python's and NumPy's global
    generators are seeded too), so the surrogate's and featurizer's initial parameters do not depend on
    what ran before; with a weight featurizer and ``modules``, :func:`warm_featurizer` then runs under the
    same generator. The caller's torch generator is left as it was.

    Args:
        name: As for :func:`build_searcher`.
        space: The search space.
        cap: The per-trial epoch cap.
        seed: The initialisation seed (a study derives it: ``derive_seed(study_seed, "searcher")``).
        modules: Builds the module of a weight key (what the optimizer gets); needed for the warm-up.
        weights: As for :func:`build_searcher`.
        curve: As for :func:`build_searcher`.
        device: As for :func:`build_searcher`.
        surrogate_options: As for :func:`build_searcher`.
        featurizer_options: As for :func:`build_searcher`.
        frozen_layers: As for :func:`build_searcher`.
        hide_hub: As for :func:`build_searcher`.
        promotion_probability: As for :func:`build_searcher`.
        max_rows: As for :func:`build_searcher`.
        prior: As for :func:`build_searcher`.
        pending: As for :func:`build_searcher`.
        fantasies: As for :func:`build_searcher`.

    Raises:
        FMSError: as :func:`build_searcher` and :func:`warm_featurizer`.
    """
    with torch.random.fork_rng(devices=[]):
        seed_everything_quietly(seed)
        search = build_searcher(
            name,
            space,
            cap,
            weights=weights,
            curve=curve,
            device=device,
            surrogate_options=surrogate_options,
            featurizer_options=featurizer_options,
            frozen_layers=frozen_layers,
            hide_hub=hide_hub,
            promotion_probability=promotion_probability,
            max_rows=max_rows,
            prior=prior,
            pending=pending,
            fantasies=fantasies,
        )
        if search.uses_weights and modules is not None:
            warm_featurizer(search, space, modules, weights)
    return search


def warm_featurizer(search: Searcher, space: SearchSpace, modules: ModuleProvider, weights: str) -> None:
    """Embed every hub entry once, before any decision.

    This builds the featurizer's per-architecture parts in hub order (so they do not depend on which
    architecture is trained first, and a resumed study's featurizer has the structure of the one whose state
    it loads) and refuses, in one line, a featurizer that cannot read an architecture (NFN with
    ``fallback=False`` needs a plain chain of layers).

    Args:
        search: The searcher (nothing to do unless its surrogate has a featurizer).
        space: The search space; its hub choice lists the entries.
        modules: Builds the pretrained module of the weight key ``("hub", entry)``.
        weights: The featurizer's name (for the messages).

    Raises:
        FMSError: the space has no hub choice, or the featurizer cannot embed an entry.
    """
    if space.hub_key is None:
        raise FMSError(f"weights={weights!r} needs a model hub (the search space has no hub choice)")
    featurizer = getattr(getattr(search, "surrogate", None), "featurizer", None)
    if featurizer is None:
        return
    for entry in getattr(space[space.hub_key], "choices", ()):
        key = ("hub", str(entry))
        module = modules(key, {space.hub_key: entry})
        try:
            with torch.no_grad():
                featurizer([module], [key])
        except FMSError as error:
            raise FMSError(f"weights={weights!r} cannot embed hub entry {entry!r}: {error}") from None
