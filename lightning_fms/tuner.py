"""FMSTuner: fine-tunes hub models one epoch at a time and lets the searcher choose who goes next.

Each decision: the optimizer proposes one epoch of one trial, the executor trains it (a fresh
Lightning ``Trainer`` resumed from the trial's checkpoint), the result is told to the optimizer, and
the study state is written atomically. Kill the process at any moment and run the same command
again: the study resumes from its last completed epoch and, with the same seed, makes the same
decisions as a run that was never interrupted.

Each epoch is committed through the study's :class:`~lightning_fms.study.ledger.StudyLedger`, which
also owns the checkpoint policy (a paused trial keeps one checkpoint, ``best.ckpt`` holds the best epoch's).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from lightning_fms.errors import CheckpointError, FMSError
from lightning_fms.frozen.levels import FrozenLayers, check_fractions
from lightning_fms.hub import ModelHub
from lightning_fms.observer import StudyObserver
from lightning_fms.options import FALLBACK_MODE, StudyOptions
from lightning_fms.parallel.driver import ConcurrentDriver
from lightning_fms.parallel.protocol import is_concurrent
from lightning_fms.progress import StudyProgress
from lightning_fms.search.optimizer import FreezeThawOptimizer, Suggestion, SuggestionKind
from lightning_fms.search.searcher import seeded_searcher
from lightning_fms.search.seeds import derive_seed
from lightning_fms.search.space import SearchSpace
from lightning_fms.study.directory import StudyDirectory
from lightning_fms.study.ledger import StudyLedger
from lightning_fms.study.modules import StudyModules
from lightning_fms.study.snapshots import WeightSnapshots
from lightning_fms.training.executor import EpochJob, EpochOutcome, Executor
from lightning_fms.training.in_process import InProcessExecutor
from lightning_fms.training.trial_builder import DEFAULT_EPOCHS_ARGUMENT, DEFAULT_HUB_ARGUMENT

log = logging.getLogger(__name__)

#: The declared options (:class:`~lightning_fms.options.StudyOptions`): FMSTuner's defaults are read from it.
_DECLARED = StudyOptions()


@dataclass(frozen=True)
class TuneResult:
    """The outcome of a study.

    Attributes:
        best_trial: Id of the trial with the best recorded value (``None`` if nothing succeeded).
        best_epoch: The epoch of that value.
        best_value: The value.
        best_config: The trial's configuration.
        best_checkpoint: Path of ``best.ckpt``.
        epochs_spent: Epochs trained over all trials.
        study_dir: The study directory.
    """

    best_trial: int | None
    best_epoch: int | None
    best_value: float | None
    best_config: dict[str, Any] | None
    best_checkpoint: Path | None
    epochs_spent: int
    study_dir: Path

    def summary(self) -> dict[str, Any]:
        """The result as plain data (what ``lightning-fms`` prints)."""
        return {
            "best_trial": self.best_trial,
            "best_epoch": self.best_epoch,
            "best_value": self.best_value,
            "best_config": self.best_config,
            "best_checkpoint": str(self.best_checkpoint) if self.best_checkpoint else None,
            "epochs_spent": self.epochs_spent,
            "results": str(self.study_dir / "results.json"),
        }


class FMSTuner:
    """Freeze-thaw hyperparameter and hub-entry search over Lightning fine-tuning runs.

    The epochs run in an :class:`~lightning_fms.training.executor.Executor`: give one as ``executor=`` (for
    example an :class:`~lightning_fms.training.in_process.InProcessExecutor` of trials built by a
    LightningCLI), or give a module factory and a datamodule factory, from which the tuner builds the
    in-process executor itself (``FMSTuner(MyModule, MyData, space, ...)``).

    Args:
        module_factory: Builds the LightningModule; receives the pretrained hub module as
            ``hub_argument``, the trial's cap as ``epochs_argument`` (if it accepts it) and the space's
            ``model.*`` values. Only without ``executor``.
        datamodule_factory: Builds the LightningDataModule from the space's ``data.*`` values. Only without
            ``executor``.
        space: The search space.
        study_dir: Where the study lives (created if missing; resumed if it holds a study).
        budget: Total epochs to train over all trials.
        monitor: Metric to optimise (logged by the module at validation).
        mode: ``"max"`` or ``"min"``.
        hub: The model hub (needed when the space has a hub choice; its families label the reports).
        max_epochs_per_trial: Per-trial epoch cap (and LR-schedule horizon).
        seed: Seeds every decision and every trial.
        searcher: ``"fms"`` (the plain GP's kernel plus curve and weight terms), ``"dyhpo"`` (deep-kernel GP),
            ``"gp"`` (plain GP) or ``"random"``.
        weights: Checkpoint featurizer: ``"auto"`` (``"summary"`` for ``"fms"`` with a hub choice, else
            ``"none"``), ``"none"`` (the deep kernel is then DyHPO) or a featurizer's name.
        curve: ``"cnn"`` or ``"none"``.
        device: Surrogate device (``None``: CUDA when present).
        num_fresh_candidates: Fresh configurations scored per decision.
        num_startup_trials: Random configurations started before the searcher is consulted.
        max_paused_trials: Bound on paused trials (their checkpoints); ``None``: unbounded.
        max_surrogate_rows: Cap on the surrogate's training rows (every row of the longest trials is kept);
            ``None``: no cap.
        promotion_probability: Per decision, the probability of continuing the best paused trial of the highest
            rung without the surrogate; ``None``: the searcher's default.
        pending: How epochs running on other workers enter a decision's fit (a concurrent executor only):
            ``"constant_liar"``, ``"kriging_believer"``, ``"fantasies"`` or ``"ignore"``
            (:mod:`lightning_fms.search.pending`).
        fantasies: Posterior draws of ``pending="fantasies"``.
        hub_argument: Module argument receiving the pretrained hub module (only without ``executor``).
        epochs_argument: Module argument receiving the per-trial cap (only without ``executor``).
        weights_attribute: Submodule whose weights feed the featurizer (default: ``hub_argument``; only
            without ``executor``).
        module_options: Fixed module arguments (only without ``executor``).
        datamodule_options: Fixed datamodule arguments (only without ``executor``).
        trainer_options: Extra ``Trainer`` arguments (only without ``executor``).
        surrogate_options: Extra surrogate arguments.
        featurizer_options: Extra featurizer arguments.
        progress: Show a live progress display.
        observers: Hooks called as the study progresses (e.g. W&B logging).
        frozen_layers: The frozen-layer fidelity (:mod:`lightning_fms.frozen.levels`): ``False``/``None``
            (off, the default), ``True`` (trainable fractions 0.25, 0.5, 1) or a list of fractions in
            ``(0, 1]``. Each decision then also picks how many layer units an epoch trains, and the
            budget counts full-epoch equivalents at the cost model of each level.
        prior: A prior written by ``lightning-fms pretrain`` (its path, or a
            :class:`~lightning_fms.transfer.prior.Prior`): fresh surrogate fits start from it (docs/transfer.md).
            It must fit the searcher, featurizer, curve setting, frozen-layer setting and non-hub space (it is
            refused in one line otherwise, before anything is written); only ``"fms"`` and ``"dyhpo"`` take
            one. Its fingerprint is recorded with the study, which is never resumed with another prior or none.
        executor: Runs the epochs; default: an
            :class:`~lightning_fms.training.in_process.InProcessExecutor` of the factories and options above.
            Every job carries ``monitor`` and ``max_epochs_per_trial``, so an executor built with another
            monitor or cap refuses the first job (:class:`~lightning_fms.errors.FMSError`), before training.

    Raises:
        FMSError: neither an executor nor both factories, or both; executor options next to an executor; a prior
            that cannot be read or does not fit (:class:`~lightning_fms.transfer.prior.PriorError`).
    """

    def __init__(
        self,
        module_factory: Callable[..., pl.LightningModule] | None = None,
        datamodule_factory: Callable[..., pl.LightningDataModule] | None = None,
        space: SearchSpace | None = None,
        *,
        study_dir: str | os.PathLike[str],
        budget: int,
        monitor: str,
        mode: str = FALLBACK_MODE,
        hub: ModelHub | None = None,
        max_epochs_per_trial: int = _DECLARED.max_epochs_per_trial,
        seed: int = _DECLARED.seed,
        searcher: str = _DECLARED.searcher,
        weights: str = _DECLARED.weights,
        curve: str = _DECLARED.curve,
        device: str | None = _DECLARED.device,
        num_fresh_candidates: int = _DECLARED.num_fresh_candidates,
        num_startup_trials: int = _DECLARED.num_startup_trials,
        max_paused_trials: int | None = _DECLARED.max_paused_trials,
        max_surrogate_rows: int | None = _DECLARED.max_surrogate_rows,
        promotion_probability: float | None = _DECLARED.promotion_probability,
        pending: str = _DECLARED.pending,
        fantasies: int = _DECLARED.fantasies,
        hub_argument: str = DEFAULT_HUB_ARGUMENT,
        epochs_argument: str = DEFAULT_EPOCHS_ARGUMENT,
        weights_attribute: str | None = _DECLARED.weights_attribute,
        module_options: dict[str, Any] | None = None,
        datamodule_options: dict[str, Any] | None = None,
        trainer_options: dict[str, Any] | None = None,
        surrogate_options: dict[str, Any] | None = _DECLARED.surrogate_options,
        featurizer_options: dict[str, Any] | None = _DECLARED.featurizer_options,
        progress: bool = True,
        observers: Sequence[StudyObserver] = (),
        frozen_layers: bool | Sequence[float] | None = _DECLARED.frozen_layers,
        prior: str | os.PathLike[str] | Any | None = _DECLARED.prior,
        executor: Executor | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise FMSError("monitor must name a logged metric")
        if not isinstance(space, SearchSpace):
            raise FMSError("FMSTuner needs a search space (space=SearchSpace...)")
        fractions = check_fractions(frozen_layers)
        self.space = space
        self.hub = hub
        self.study = StudyDirectory(study_dir)
        self.seed = int(seed)
        self.progress = progress
        self.observers = list(observers)
        if executor is not None:
            given = {
                "module_factory": module_factory,
                "datamodule_factory": datamodule_factory,
                "weights_attribute": weights_attribute,
                "module_options": module_options,
                "datamodule_options": datamodule_options,
                "trainer_options": trainer_options,
                "hub_argument": None if hub_argument == DEFAULT_HUB_ARGUMENT else hub_argument,
                "epochs_argument": None if epochs_argument == DEFAULT_EPOCHS_ARGUMENT else epochs_argument,
            }
            clash = [name for name, value in given.items() if value is not None]
            if clash:
                raise FMSError(f"{', '.join(clash)} configure the default executor and cannot be given with executor=")
            self.executor: Executor = executor
        elif module_factory is None or datamodule_factory is None:
            raise FMSError("FMSTuner needs an executor= or a module factory and a datamodule factory")
        else:
            self.executor = InProcessExecutor.from_factories(
                module_factory,
                datamodule_factory,
                space,
                hub,
                monitor=monitor,
                cap=max_epochs_per_trial,
                hub_argument=hub_argument,
                epochs_argument=epochs_argument,
                weights_attribute=weights_attribute,
                module_options=module_options,
                datamodule_options=datamodule_options,
                trainer_options=trainer_options,
            )
        self.modules = StudyModules(space, self.executor.pretrained_module, WeightSnapshots(self.study.weights_dir))
        """The featurizer's modules: each hub entry's ``W_0`` and each trained epoch's weights."""
        search = seeded_searcher(
            searcher,
            space,
            max_epochs_per_trial,
            seed=derive_seed(seed, "searcher"),
            modules=self.modules,
            weights=weights,
            curve=curve,
            device=device,
            surrogate_options=surrogate_options,
            featurizer_options=featurizer_options,
            frozen_layers=fractions is not None,
            promotion_probability=promotion_probability,
            max_rows=max_surrogate_rows,
            pending=pending,
            fantasies=fantasies,
            prior=prior,
        )
        self.frozen_layers = self._frozen_layer_model(fractions) if fractions is not None else None
        self.snapshots = self.modules.snapshots if search.uses_weights else None
        self.optimizer = FreezeThawOptimizer(
            space,
            search,
            budget=budget,
            max_epochs_per_trial=max_epochs_per_trial,
            mode=mode,
            seed=seed,
            num_fresh_candidates=num_fresh_candidates,
            num_startup_trials=num_startup_trials,
            max_paused_trials=max_paused_trials,
            modules=self.modules if search.uses_weights else None,
            frozen_layers=self.frozen_layers,
        )
        self.monitor = monitor
        self.mode = mode
        self.ledger = StudyLedger(
            self.study, monitor=monitor, mode=mode, families=self._families(), snapshots=self.snapshots
        )

    # ------------------------------------------------------------------ cost model
    def _frozen_layer_model(self, fractions: tuple[float, ...]) -> FrozenLayers:
        """The cost model of every hub entry (or of the one architecture without a hub), on one real batch."""
        rng = np.random.default_rng(derive_seed(self.seed, "frozen-layer-costs"))
        config = self.space.sample(rng)
        hub_key = self.space.hub_key
        entries = list(getattr(self.space[hub_key], "choices", ())) if hub_key else [""]
        configs = [{**config, hub_key: entry} if hub_key else config for entry in entries]
        with torch.random.fork_rng(devices=[]):  # building the trials seeds the generators: fork torch's
            costs = self.executor.frozen_layer_costs(configs, fractions)
        return FrozenLayers(fractions, {str(entry): cost for entry, cost in zip(entries, costs, strict=True)})

    # ------------------------------------------------------------------ the loop
    def run(self) -> TuneResult:
        """Run (or resume) the study until the budget is spent.

        Raises:
            FMSError: a problem with the set-up or the study directory; what was recorded is kept.
        """
        self.study.lock()
        try:
            self._restore()
            if self.snapshots is not None:  # W_0 of each entry, once, for the featurizer of this and later studies
                self.modules.store_pretrained(self.hub)
            for observer in self.observers:
                observer.on_study_start(self.ledger.view(self.optimizer))
            display = StudyProgress(self.optimizer.budget, enabled=self.progress)
            with display:
                display.update(self.optimizer, self.best_label())
                if is_concurrent(self.executor):
                    ConcurrentDriver(self, self.executor).run(display)
                else:
                    while (suggestion := self.optimizer.ask()) is not None:
                        self._run_one(suggestion)
                        display.update(self.optimizer, self.best_label())
            self.ledger.write_reports(self.optimizer, final=True)
            for observer in self.observers:
                observer.on_study_end(self.ledger.view(self.optimizer))
            return self._result()
        finally:
            self.study.unlock()

    def epoch_job(self, suggestion: Suggestion, checkpoint_out: Path | None = None) -> EpochJob:
        """The job that trains ``suggestion`` (its checkpoint to ``checkpoint_out``, default the ledger's path).

        Raises:
            CheckpointError: a paused trial's checkpoint is missing or changed.
        """
        trial_id, epoch = suggestion.trial_id, suggestion.epoch
        resume_from = self.ledger.resume_checkpoint(trial_id) if suggestion.kind == SuggestionKind.RESUME else None
        return EpochJob(
            trial_id=trial_id,
            config=suggestion.config,
            epoch=epoch,
            resume_from=resume_from,
            checkpoint_out=checkpoint_out
            if checkpoint_out is not None
            else self.ledger.checkpoint_path(trial_id, epoch),
            log_dir=self.study.trial_dir(trial_id),
            seed=self.seed,
            monitor=self.monitor,
            cap=self.optimizer.cap,
            trainable_fraction=suggestion.fraction if self.frozen_layers is not None else None,
            record_weights=self.snapshots is not None,
        )

    def _run_one(self, suggestion: Suggestion) -> None:
        """Train the suggested epoch in this process's executor and commit it."""
        try:
            outcome = self.executor.run_epoch(self.epoch_job(suggestion))
        except BaseException:
            self.optimizer.abandon_pending()
            raise
        self.commit_epoch(suggestion.trial_id, suggestion.epoch, outcome)

    def commit_epoch(
        self,
        trial_id: int,
        epoch: int,
        outcome: EpochOutcome,
        *,
        worker: str | None = None,
        checkpoint: Path | None = None,
    ) -> None:
        """Commit an epoch through the ledger, then tell the observers.

        Args:
            trial_id: The trial.
            epoch: The epoch.
            outcome: What it produced.
            worker: Who trained it, for a claimed epoch (``None``: the pending ``ask`` of this process).
            checkpoint: Where its checkpoint is, when not at the ledger's default path.
        """
        if outcome.error is not None:
            log.warning("trial %d failed at epoch %d: %s", trial_id, epoch, outcome.error)
        claimed = trial_id in self.optimizer.running
        self.ledger.commit(
            self.optimizer, trial_id, epoch, outcome, claimed=claimed, worker=worker, checkpoint=checkpoint
        )
        if self.observers:
            view = self.ledger.view(self.optimizer)
            for observer in self.observers:
                observer.on_epoch_end(view, view.trials[trial_id], epoch, dict(outcome.metrics))

    # ------------------------------------------------------------------ best checkpoint
    def best_label(self) -> str:
        """The best value so far with its trial, hub entry and epoch (``"-"`` before any), for the display."""
        best = self.ledger.best
        if best is None:
            return "-"
        trial = self.optimizer.trials[best.trial]
        entry = trial.config.get(self.space.hub_key, "") if self.space.hub_key else ""
        return f"{best.value:.4f} (trial {best.trial} {entry} epoch {best.epoch})"

    # ------------------------------------------------------------------ persistence
    def _restore(self) -> None:
        state = self.study.load_state()
        if state is None:
            return
        if "agent" in state:
            raise FMSError(
                f"study directory {self.study.path} holds a study of lightning-fms agent; use another --study_dir"
            )
        self.optimizer.load_state_dict(state)
        self.ledger.load_state_dict(state.get("tuner", {}))
        released = self.optimizer.release_all()  # this process holds the study lock: their driver is gone
        if released:
            log.warning("gave back %d epochs that a stopped run had in flight (trials %s)", len(released), released)
            self.ledger.save(self.optimizer)
        self.ledger.prune_orphans()
        self.study.delete_stale_temporaries()
        log.info("resumed study %s at %d epochs", self.study.path, self.optimizer.epochs_spent)

    # ------------------------------------------------------------------ outputs
    def _families(self) -> dict[str, str]:
        if self.hub is None:
            return {}
        return {entry.name: entry.family for entry in self.hub}

    def _result(self) -> TuneResult:
        best = self.optimizer.best()
        if best is None:
            return TuneResult(None, None, None, None, None, self.optimizer.epochs_spent, self.study.path)
        return TuneResult(
            best_trial=best.trial_id,
            best_epoch=best.epoch,
            best_value=best.value,
            best_config=dict(self.optimizer.trials[best.trial_id].config),
            best_checkpoint=self.study.best_checkpoint_path,
            epochs_spent=self.optimizer.epochs_spent,
            study_dir=self.study.path,
        )


def load_best_weights(study_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The ``state_dict`` stored in a study's ``best.ckpt`` (read with ``weights_only=True``)."""
    path = Path(study_dir) / "best.ckpt"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
