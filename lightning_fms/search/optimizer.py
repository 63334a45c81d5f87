"""The freeze-thaw optimizer: candidates, budget accounting and the ask/tell protocol.

Usable without Lightning::

    opt = FreezeThawOptimizer(space, budget=100, max_epochs_per_trial=20, searcher=RandomSearcher())
    while (suggestion := opt.ask()) is not None:
        value = train_one_epoch(suggestion.config, suggestion.trial_id, suggestion.epoch)
        opt.tell(suggestion.trial_id, suggestion.epoch, value)

Each decision buys exactly one epoch of one trial: a fresh configuration's first epoch, or the next
epoch of a paused trial. The candidate set is every paused trial at its budget + 1 plus
``num_fresh_candidates`` fresh configurations at epoch 1. The budget counts epochs actually trained
(a failed epoch counts: it cost the compute), so the study stops exactly at it.

All randomness derives from ``(seed, decision index)``; with the state from :meth:`state_dict` a study
restarted after a crash makes the very decisions it would have made had it never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_fms.errors import FMSError, first_line
from lightning_fms.frozen.levels import FrozenLayers
from lightning_fms.search.decision import ClaimedEpoch, Decision, Suggestion, SuggestionKind
from lightning_fms.search.rows import Candidate, ModuleProvider, RowSpec, pretrained_key, weight_key_before
from lightning_fms.search.searcher import Searcher, SelectionContext, SurrogateSearcher
from lightning_fms.search.seeds import derive_seed
from lightning_fms.search.space import SearchSpace
from lightning_fms.search.trial import Trial, TrialStatus, config_key, to_score

STATE_VERSION = 1
DEFAULT_FRESH_CANDIDATES = 64
"""Fresh configurations offered per decision unless told otherwise (the study options take it from here)."""
DEFAULT_STARTUP_TRIALS = 2
"""Random configurations started before the searcher is consulted, unless told otherwise."""
_SLACK = 1e-9


@dataclass(frozen=True)
class Observation:
    """The best recorded value: ``value`` after ``epoch`` of trial ``trial_id``."""

    trial_id: int
    epoch: int
    value: float


class FreezeThawOptimizer:
    """Ask/tell core of the tuner: one epoch of one trial per decision.

    Args:
        space: The search space.
        searcher: Chooses among candidates (see :mod:`lightning_fms.search.searcher`).
        budget: Total epochs to train over all trials (>= 1).
        max_epochs_per_trial: Per-trial epoch cap (>= 1); also the horizon of each trial's LR schedule.
        mode: ``"max"`` or ``"min"`` for the monitored metric.
        seed: Seeds every random choice.
        num_fresh_candidates: Fresh configurations sampled per decision.
        num_startup_trials: The first decisions start this many random configurations before the
            searcher is asked.
        max_paused_trials: Keep at most this many paused trials (and their checkpoints); beyond it the
            paused trial with the worst latest score is stopped. ``None``: no limit.
        modules: Builds a module for a weight key (needed when the searcher uses weights).
        configurations: A finite pool to choose fresh configurations from instead of sampling the
            space (e.g. a benchmark's tabulated pool or a user's grid); each must be valid for ``space``.
            Each decision offers up to ``num_fresh_candidates`` of the pool's not yet started
            configurations (all of them when fewer are left).
    """

    def __init__(
        self,
        space: SearchSpace,
        searcher: Searcher,
        *,
        budget: int,
        max_epochs_per_trial: int,
        mode: str = "max",
        seed: int = 0,
        num_fresh_candidates: int = DEFAULT_FRESH_CANDIDATES,
        num_startup_trials: int = DEFAULT_STARTUP_TRIALS,
        max_paused_trials: int | None = None,
        modules: ModuleProvider | None = None,
        configurations: Sequence[dict[str, Any]] | None = None,
        frozen_layers: FrozenLayers | None = None,
    ) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise FMSError(f"budget must be an integer >= 1 epoch, got {budget!r}")
        if (
            isinstance(max_epochs_per_trial, bool)
            or not isinstance(max_epochs_per_trial, int)
            or max_epochs_per_trial < 1
        ):
            raise FMSError(f"max_epochs_per_trial must be an integer >= 1, got {max_epochs_per_trial!r}")
        if mode not in ("max", "min"):
            raise FMSError(f"mode must be 'max' or 'min', got {mode!r}")
        if num_fresh_candidates < 1:
            raise FMSError(f"num_fresh_candidates must be >= 1, got {num_fresh_candidates}")
        if max_paused_trials is not None and max_paused_trials < 1:
            raise FMSError(f"max_paused_trials must be >= 1 or None, got {max_paused_trials}")
        if configurations is not None:
            configurations = [dict(c) for c in configurations]
            if not configurations:
                raise FMSError("configurations must hold at least one configuration")
            for i, config in enumerate(configurations):
                try:
                    space.validate(config)
                except FMSError as error:
                    raise FMSError(f"configuration #{i} does not fit the space: {error}") from None
        self.configurations = configurations
        self.frozen_layers = frozen_layers
        self.space = space
        self.searcher = searcher
        self.budget = budget
        self.cap = max_epochs_per_trial
        self.mode = mode
        self.seed = int(seed)
        self.num_fresh_candidates = num_fresh_candidates
        self.num_startup_trials = num_startup_trials
        self.max_paused_trials = max_paused_trials
        self.modules = modules
        self.trials: dict[int, Trial] = {}
        self.decisions: list[dict[str, Any]] = []
        self.epochs_spent = 0
        self.budget_spent = 0.0
        self._pending: Decision | None = None
        self._searcher_state_after_ask: dict[str, Any] | None = None
        self._searcher_state_committed: dict[str, Any] = {}
        self.stopped_by_limit: list[int] = []
        self.running: dict[int, ClaimedEpoch] = {}

    # ------------------------------------------------------------------ queries
    @property
    def is_done(self) -> bool:
        """Whether the budget (in full-epoch equivalents) is spent."""
        return self.budget_spent >= self.budget - _SLACK

    @property
    def pending(self) -> Suggestion | None:
        """The suggestion handed out by :meth:`ask` and not yet told."""
        pending = self._pending
        return None if pending is None else pending.suggestion(self.trials[pending.trial_id].config)

    def best(self) -> Observation | None:
        """The best value recorded at any epoch of any trial (ties: the earliest)."""
        best: Observation | None = None
        best_score = -math.inf
        for trial in self.trials.values():
            for k, value in enumerate(trial.values, start=1):
                score = to_score(value, self.mode)
                if score > best_score:
                    best, best_score = Observation(trial.id, k, value), score
        return best

    def candidates(self, decision: int) -> list[Candidate]:
        """Paused trials at their next epoch, then fresh configurations at epoch 1 (seeded by ``decision``).

        With the frozen-layer fidelity each is offered at every allowed trainable fraction (a paused trial at
        its last fraction or more), and candidates that cost more than the budget left are dropped.
        """
        fresh = self._fresh_configs(decision)
        paused = [t for t in self.trials.values() if t.is_resumable]
        fl = self.frozen_layers
        if fl is None:
            return [Candidate(t.id, t.config, t.epochs + 1) for t in paused] + [Candidate(None, c, 1) for c in fresh]
        out = [
            Candidate(t.id, t.config, t.epochs + 1, f, self._cost(t.config, f))
            for t in paused
            for f in fl.levels_from(t.last_fraction)
        ]
        out += [Candidate(None, c, 1, f, self._cost(c, f)) for c in fresh for f in fl.fractions]
        left = self.budget - self.budget_spent - self.running_cost + _SLACK
        return [c for c in out if c.cost <= left]

    @property
    def running_cost(self) -> float:
        """Full-epoch equivalents of the epochs claimed and not yet completed (they count against the budget)."""
        return float(sum(claimed.decision.cost for claimed in self.running.values()))

    def _cost(self, config: dict[str, Any], fraction: float) -> float:
        """Full-epoch equivalents an epoch of ``config`` at ``fraction`` is charged."""
        if self.frozen_layers is None:
            return 1.0
        key = str(config[self.space.hub_key]) if self.space.hub_key else ""
        return self.frozen_layers.cost(key, fraction)

    def _fresh_configs(self, decision: int) -> list[dict[str, Any]]:
        """Fresh configurations offered at ``decision``: sampled from the space, or from ``configurations``."""
        rng = np.random.default_rng(derive_seed(self.seed, "fresh", decision))
        seen = {config_key(t.config) for t in self.trials.values()}
        fresh: list[dict[str, Any]] = []
        if self.configurations is not None:
            unseen = [c for c in self.configurations if config_key(c) not in seen]
            if len(unseen) > self.num_fresh_candidates:
                picks = rng.choice(len(unseen), size=self.num_fresh_candidates, replace=False)
                unseen = [unseen[i] for i in picks]  # in random order: startup draws take the first
            return [dict(c) for c in unseen]
        for _ in range(self.num_fresh_candidates * 4):
            config = self.space.sample(rng)
            key = config_key(config)
            if key not in seen:
                seen.add(key)
                fresh.append(config)
            if len(fresh) == self.num_fresh_candidates:
                break
        return fresh

    def predict(self, configs: Sequence[dict[str, Any]], epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The surrogate's forecast of each configuration's score at ``epoch`` from what is known now.

        A configuration some trial has trained is forecast from its learning curve and its latest
        weights; any other from its pretrained weights. The surrogate is used as last fitted (no refit).

        Args:
            configs: ``M`` configurations.
            epoch: The epoch to forecast (default: the per-trial cap).

        Returns:
            ``(mean, variance)``, each ``[M]`` float64, in score units (larger is better; for
            ``mode="min"`` the negated metric).

        Raises:
            FMSError: the searcher has no surrogate, or it was not fitted yet.
        """
        if not isinstance(self.searcher, SurrogateSearcher):
            raise FMSError(f"{type(self.searcher).__name__} makes no forecasts; use a surrogate searcher")
        epoch = self.cap if epoch is None else int(epoch)
        if not 1 <= epoch <= self.cap:
            raise FMSError(f"epoch must be in [1, {self.cap}], got {epoch}")
        by_key = {config_key(t.config): t for t in self.trials.values() if t.status != TrialStatus.RUNNING}
        specs = []
        for config in configs:
            trial = by_key.get(config_key(config))
            known = min(trial.epochs, epoch - 1) if trial is not None else 0
            if trial is None or known == 0 or any(not math.isfinite(v) for v in trial.values[:known]):
                specs.append(RowSpec(dict(config), epoch, (), pretrained_key(self.space, config)))
                continue
            curve = tuple(to_score(v, self.mode) for v in trial.values[:known])
            weight_key = weight_key_before(self.space, trial.id, config, known + 1)
            specs.append(RowSpec(dict(config), epoch, curve, weight_key))
        context = self.selection_context()
        try:
            mean, variance = self.searcher.predict(context, specs)
        except (RuntimeError, AttributeError) as error:
            raise FMSError(f"the surrogate cannot forecast yet (is it fitted?): {error}") from None
        return mean.double().numpy(), variance.double().numpy()

    # ------------------------------------------------------------------ ask / tell
    def ask(self) -> Suggestion | None:
        """The next epoch to train, or ``None`` when the budget is spent or nothing is left to train.

        Raises:
            RuntimeError: the previous suggestion was not told yet.
        """
        if self._pending is not None:
            raise RuntimeError(f"trial {self._pending.trial_id} epoch {self._pending.epoch} was asked and not told")
        if self.is_done:
            return None
        decision = self._choose(self._next_index())
        if decision is None:
            return None
        self._pending = decision
        self._searcher_state_after_ask = self.searcher.state_dict()
        return self.pending

    def _next_index(self) -> int:
        """The next decision's index: one past every index recorded or running (an epoch given back frees none)."""
        used = [int(d["decision"]) for d in self.decisions] + [c.decision.index for c in self.running.values()]
        return max(used, default=-1) + 1

    def _choose(self, index: int, current_fit: bool = False) -> Decision | None:
        """Decision ``index``: pick the next epoch (startup draws, then the searcher) and mark its trial running.

        Args:
            index: The decision's index (it seeds the fresh candidates and the searcher).
            current_fit: Score with the surrogate as last fitted instead of refitting (a surrogate searcher's
                :meth:`~lightning_fms.search.searcher.SurrogateSearcher.select_with_current_fit`).

        Returns:
            The decision, or ``None`` when no candidate is left.
        """
        candidates = self.candidates(index)
        if not candidates:
            return None
        if len(self.trials) < self.num_startup_trials:
            fresh = [i for i, c in enumerate(candidates) if c.trial_id is None]
            position, diagnostics = (fresh[0] if fresh else 0), {"surrogate_s": 0.0}
        else:
            context = self.selection_context()
            seed = derive_seed(self.seed, "surrogate", index)
            if current_fit and isinstance(self.searcher, SurrogateSearcher):
                selection = self.searcher.select_with_current_fit(context, candidates, seed)
            else:
                selection = self.searcher.select(context, candidates, seed)
            position, diagnostics = selection.index, selection.info
        chosen = candidates[position]
        if chosen.trial_id is None:
            trial = Trial(id=max(self.trials, default=-1) + 1, config=dict(chosen.config))
            self.trials[trial.id] = trial
            kind = SuggestionKind.START
        else:
            trial = self.trials[chosen.trial_id]
            kind = SuggestionKind.RESUME
        trial.status = TrialStatus.RUNNING
        return Decision(
            index=index,
            trial_id=trial.id,
            kind=kind,
            epoch=chosen.epoch,
            candidates=len(candidates),
            fraction=float(chosen.fraction),
            cost=chosen.cost,
            frozen_layers=self.frozen_layers is not None,
            diagnostics=tuple(diagnostics.items()),
        )

    def selection_context(self) -> SelectionContext:
        """What the searcher sees now: the space, every trial, and the epochs running now as pending rows."""
        return SelectionContext(
            self.space,
            self.trials,
            self.mode,
            self.cap,
            self.modules,
            frozen_layers=self.frozen_layers is not None,
            pending=tuple(self._pending_specs()),
        )

    def _pending_specs(self) -> list[RowSpec]:
        """One row per epoch running now (claimed, not completed): what the searcher treats as pending."""
        specs = []
        for trial_id, claimed in self.running.items():
            trial = self.trials[trial_id]
            epoch = claimed.decision.epoch
            curve = tuple(to_score(v, self.mode) for v in trial.values[: epoch - 1])
            key = weight_key_before(self.space, trial_id, trial.config, epoch)
            specs.append(RowSpec(dict(trial.config), epoch, curve, key, claimed.decision.fraction))
        return specs

    def tell(self, trial_id: int, epoch: int, value: float, wall_s: float = 0.0) -> list[int]:
        """Record the monitored value after ``epoch`` of ``trial_id``.

        A value that is not finite marks the trial failed. Returns the ids of trials stopped to respect
        ``max_paused_trials`` (their checkpoints may be deleted).
        """
        decision = self._check_pending(trial_id, epoch)
        self._end_pending()
        return self._record(decision, value, wall_s, error=None)

    def tell_failure(self, trial_id: int, epoch: int, error: str, wall_s: float = 0.0) -> list[int]:
        """Record that ``epoch`` of ``trial_id`` failed with ``error``; the epoch still counts against the budget."""
        decision = self._check_pending(trial_id, epoch)
        self._end_pending()
        return self._record(decision, math.nan, wall_s, error=error)

    def _check_pending(self, trial_id: int, epoch: int) -> Decision:
        pending = self._pending
        if pending is None or pending.trial_id != trial_id or pending.epoch != epoch:
            expected = "nothing" if pending is None else f"trial {pending.trial_id} epoch {pending.epoch}"
            raise RuntimeError(f"told trial {trial_id} epoch {epoch}, but {expected} was asked")
        return pending

    def _end_pending(self) -> None:
        """The asked decision is told: the searcher state after its ask becomes the committed one."""
        self._searcher_state_committed = self._searcher_state_after_ask or {}
        self._pending = None

    def _record(
        self, decision: Decision, value: float, wall_s: float, error: str | None, worker: str | None = None
    ) -> list[int]:
        """Commit a decision's outcome (``tell``/``tell_failure`` and ``complete`` alike).

        The trial gets the value (or fails, also when the value is not finite), the budget is charged the
        decision's cost, the decision log gets its entry, and paused trials beyond ``max_paused_trials`` are
        stopped.

        Returns:
            The ids of the trials stopped by ``max_paused_trials``.
        """
        trial = self.trials[decision.trial_id]
        if error is None and not math.isfinite(value):
            error = f"monitored value is {value} at epoch {decision.epoch}"
        if error is None:
            value = float(value)
            trial.values.append(value)
            trial.status = TrialStatus.FINISHED if trial.epochs >= self.cap else TrialStatus.PAUSED
        else:
            value = math.nan
            trial.status = TrialStatus.FAILED
            trial.error = first_line(error, limit=500) or "failed"
        trial.wall_s.append(float(wall_s))
        if self.frozen_layers is not None:
            trial.fractions.append(decision.fraction)
        self.epochs_spent += 1
        self.budget_spent += float(decision.cost)
        entry = decision.log_entry(value, self.epochs_spent, self.budget_spent, wall_s)
        if worker is not None:
            entry["worker"] = worker
        self.decisions.append(entry)
        return self._enforce_paused_limit() if error is None else []

    def _enforce_paused_limit(self) -> list[int]:
        if self.max_paused_trials is None:
            return []
        stopped = []
        paused = [t for t in self.trials.values() if t.status == TrialStatus.PAUSED]
        while len(paused) > self.max_paused_trials:
            worst = min(paused, key=lambda t: (to_score(t.values[-1], self.mode), -t.id))
            worst.status = TrialStatus.STOPPED
            stopped.append(worst.id)
            paused.remove(worst)
        self.stopped_by_limit.extend(stopped)
        return stopped

    def abandon_pending(self) -> None:
        """Forget the pending suggestion as if it had never been asked (a new trial it started is removed)."""
        pending = self._pending
        if pending is None:
            return
        self._forget(pending)
        self._pending = None
        self.searcher.load_state_dict(self._searcher_state_committed)

    def _forget(self, decision: Decision) -> None:
        """Undo a decision's choice: the trial it started is removed, the trial it resumed is paused again."""
        if decision.kind == SuggestionKind.START:
            del self.trials[decision.trial_id]
        else:
            self.trials[decision.trial_id].status = TrialStatus.PAUSED

    # ------------------------------------------------------------------ persistence
    def settings(self) -> dict[str, Any]:
        """What must match for a persisted study to be continued by this optimizer."""
        settings = {"space": self.space.to_dict(), "cap": self.cap, "mode": self.mode, "seed": self.seed}
        if self.frozen_layers is not None:
            settings["frozen_layers"] = list(self.frozen_layers.fractions)
        if self.searcher.prior_fingerprint is not None:
            settings["prior"] = self.searcher.prior_fingerprint
        return settings

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue (tensors, lists, dicts and scalars only); never includes a pending epoch."""
        return {
            "version": STATE_VERSION,
            "settings": self.settings(),
            "trials": self._committed_trials(),
            "decisions": [dict(d) for d in self.decisions],
            "epochs_spent": self.epochs_spent,
            "budget_spent": self.budget_spent,
            "stopped_by_limit": list(self.stopped_by_limit),
            "searcher": self._searcher_state_committed,
            **({"running": {str(k): v.to_record() for k, v in self.running.items()}} if self.running else {}),
        }

    def _committed_trials(self) -> list[dict[str, Any]]:
        pending = self._pending
        out = []
        for trial in self.trials.values():
            if pending is not None and trial.id == pending.trial_id:
                if pending.kind == SuggestionKind.START:
                    continue
                data = trial.to_dict()
                data["status"] = TrialStatus.PAUSED.value
                out.append(data)
            else:
                out.append(trial.to_dict())
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a persisted study.

        Raises:
            FMSError: the state belongs to a study with other settings (space, cap, mode, seed, frozen layers or
                prior).
        """
        if state.get("version") != STATE_VERSION:
            raise FMSError(f"study state version {state.get('version')} is not supported (expected {STATE_VERSION})")
        saved = state["settings"]
        mine = self.settings()
        for key in ("seed", "mode", "cap", "space", "frozen_layers"):
            if saved.get(key) != mine.get(key):
                raise FMSError(
                    f"the study directory holds a study with another {key} ({saved.get(key)!r}); "
                    f"use a new study directory or the same settings"
                )
        if saved.get("prior") != mine.get("prior"):
            raise FMSError(_prior_mismatch(saved.get("prior"), mine.get("prior")))
        self.trials = {int(d["id"]): Trial.from_dict(d) for d in state["trials"]}
        self.decisions = [dict(d) for d in state["decisions"]]
        self.epochs_spent = int(state["epochs_spent"])
        self.budget_spent = float(state.get("budget_spent", self.epochs_spent))
        self.stopped_by_limit = [int(i) for i in state.get("stopped_by_limit", [])]
        self._searcher_state_committed = state.get("searcher", {})
        self.searcher.load_state_dict(self._searcher_state_committed)
        self._pending = None
        self.running = {int(k): ClaimedEpoch.from_record(int(k), v) for k, v in state.get("running", {}).items()}
        for trial_id in self.running:
            self.trials[trial_id].status = TrialStatus.RUNNING

    # ------------------------------------------------------------------ several suggestions in flight
    def claim(self, owner: dict[str, Any], current_fit: bool = False) -> Suggestion | None:
        """Like :meth:`ask`, for several workers sharing one persisted study: the suggestion stays *running*.

        A running suggestion is part of :meth:`state_dict` (with ``owner``, e.g. the worker's pid), its
        trial is no candidate, and its epoch counts against the budget until it is completed with
        :meth:`complete` or given back with :meth:`release`. Use it on a freshly loaded state and save
        the state right after, under a lock shared by the workers. The epochs running now are the searcher's
        pending rows (:attr:`~lightning_fms.search.searcher.SelectionContext.pending`).

        Args:
            owner: Who trains it, persisted with the claim (to give it back if that worker dies).
            current_fit: Decide with the surrogate as last fitted, without refitting (while it refits elsewhere).

        Returns:
            The suggestion, or ``None`` when the budget is spent (counting running epochs) or nothing is
            left to train now.
        """
        if self._pending is not None:
            raise RuntimeError("claim() cannot be mixed with a pending ask()")
        if self.budget_spent + self.running_cost >= self.budget - _SLACK:
            return None
        decision = self._choose(self._next_index(), current_fit=current_fit)
        if decision is None:
            return None
        self._searcher_state_committed = self.searcher.state_dict()
        self.running[decision.trial_id] = ClaimedEpoch(decision, dict(owner))
        return decision.suggestion(self.trials[decision.trial_id].config)

    def complete(
        self,
        trial_id: int,
        epoch: int,
        value: float,
        wall_s: float = 0.0,
        error: str | None = None,
        worker: str | None = None,
    ) -> list[int]:
        """Record the outcome of an epoch from :meth:`claim` (``error`` set: it failed); see :meth:`tell`.

        ``worker`` (who trained it) goes into the decision log when given.
        """
        claimed = self.running.get(trial_id)
        if claimed is None or claimed.decision.epoch != epoch:
            raise RuntimeError(f"trial {trial_id} epoch {epoch} is not running")
        del self.running[trial_id]
        return self._record(claimed.decision, value, wall_s, error, worker)

    def release(self, trial_id: int) -> None:
        """Give an epoch from :meth:`claim` back untrained (its worker died): the trial is paused again or forgotten."""
        claimed = self.running.pop(trial_id, None)
        if claimed is not None:
            self._forget(claimed.decision)

    def release_all(self) -> list[int]:
        """Give back every running epoch (their owner is gone, e.g. a killed driver); the trials they were for."""
        trial_ids = list(self.running)
        for trial_id in trial_ids:
            self.release(trial_id)
        return trial_ids


def _prior_mismatch(saved: str | None, mine: str | None) -> str:
    """Why a study recorded with prior fingerprint ``saved`` cannot be resumed with ``mine`` (``None``: none)."""
    held = "the study directory holds a study run"
    if saved is None:
        return f"{held} without a prior; use a new study directory or leave the prior out"
    if mine is None:
        return f"{held} with a prior (fingerprint {saved[:12]}); use a new study directory or give the same prior"
    return (
        f"{held} with another prior (fingerprint {saved[:12]}, not {mine[:12]}); "
        "use a new study directory or give the same prior"
    )
