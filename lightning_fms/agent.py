"""``lightning-fms agent``: run the user's own training command once per decision, in several processes at once.

::

    lightning-fms agent --study_dir runs/s1 --space space.yaml --budget 30 --monitor val_acc
        -- python my_finetune.py fit --config my.yaml

Each decision the agent runs the command with the trial's values appended as ``--key=value`` (the space's
names, e.g. ``--model.lr=0.01``, which a LightningCLI script accepts as it is), ``--ckpt_path=<checkpoint>``
when it resumes a paused trial, and the environment variables of :mod:`lightning_fms.training.callback`. The
script's only change is ``FMSCheckpointCallback()`` in its Trainer's callbacks: it stops the run after the
epoch the study paid for, saves the trial checkpoint and writes a small result file that the agent tells
the study, and it seeds the run as ``lightning-fms tune`` seeds a trial's epoch (the study's seed and the
trial come through the environment), so the script trains the epoch the in-process study would train.

A model hub (``--hub hub.yaml``, the file a recipe's ``hub:`` names) makes a ``{type: hub}`` choice of the space
available: the choice is named by the argument through which the script receives its pretrained weights
(``model.pretrained: {type: hub}``), and the script receives the chosen entry's weights file there, as an
absolute path (:func:`~lightning_fms.hub.bind_weight_files`). The agent builds each entry's network from the hub
(its ``W_0``) for the surrogate's featurizer; when the study reads weights (``--weights``, or ``auto`` with the
``fms`` searcher), the callback also writes the weights of the submodule ``--weights_attribute`` names (default
``net``) after each epoch as a safetensors file beside the result, which the agent commits to the study's
snapshots. So the agent's study is the study ``lightning-fms tune`` runs with the same hub, space and settings.

Several agents may share one study directory on one machine. Each holds ``.lock`` *shared* for its whole
run (so ``lightning-fms tune``, which takes it exclusively, is refused while agents run, and the other way
round), and takes ``.agents.lock`` exclusively only around load state → choose/record → save state. A
chosen epoch is recorded in the state as *running* with the agent's host and pid: other agents never
choose that trial, and the epoch counts against the budget until it is told. A running epoch whose agent
died is given back by the next agent that looks (the trial is paused again, or forgotten if it had not
trained any epoch).

The first agent creates the study from its settings (space file, budget, monitor, ...), stored in the
state; later agents may omit them and join.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from lightning_fms.errors import CheckpointError, FMSError
from lightning_fms.hub import ModelHub
from lightning_fms.options import FALLBACK_MODE, declared_default
from lightning_fms.search.optimizer import FreezeThawOptimizer, Suggestion, SuggestionKind
from lightning_fms.search.searcher import seeded_searcher
from lightning_fms.search.seeds import derive_seed
from lightning_fms.search.space import SearchSpace
from lightning_fms.study.directory import StudyDirectory
from lightning_fms.study.ledger import StudyLedger
from lightning_fms.study.modules import StudyModules
from lightning_fms.study.snapshots import WeightSnapshots
from lightning_fms.sweep import read_space_file
from lightning_fms.training.command import CommandRunner, command_line
from lightning_fms.training.executor import EpochJob, EpochOutcome

__all__ = ["AGENT_OPTIONS", "AgentSettings", "StudyAgent", "command_line"]

log = logging.getLogger(__name__)


@dataclass
class AgentSettings:
    """Study settings given to an agent; ``None`` means "as stored" (required when the agent creates the study).

    Every field but ``space_file`` and ``hub`` is an option of :class:`~lightning_fms.options.StudyOptions` (the
    ``lightning-fms agent`` flags are generated from there, with their help); a new study takes the declared
    default of each one left out, except ``budget`` and ``monitor`` (required) and ``mode`` (the space file's
    goal, else ``"max"``). The study options an agent does not take: ``frozen_layers`` (the script would have to
    freeze layer units), ``device`` (an agent's surrogate runs on the CPU; the accelerators are the script's) and
    ``ray`` (the epochs run in the user's command).

    Attributes:
        space_file: Search-space file (the recipe's ``space`` format or a W&B sweep).
        hub: A model hub YAML (what a recipe's ``hub:`` names): a ``{type: hub}`` choice of the space picks its
            entries, and the script receives the entry's weights file at the choice's name. Stored as an absolute
            path; every agent reads it.
        budget: Total epochs over all trials.
        monitor: The metric the script logs at validation (default: the space file's).
        mode: ``"max"`` or ``"min"`` (default: the space file's, else ``"max"``).
        max_epochs_per_trial: Per-trial epoch cap.
        seed: Seed of the decisions, and of every trial's epochs (the callback seeds the script with it).
        searcher: One of :data:`~lightning_fms.search.searcher.SEARCHERS`.
        weights: The surrogate's checkpoint featurizer (``"auto"``: ``summary`` for ``fms`` with a hub choice).
        weights_attribute: Submodule of the script's LightningModule whose weights the featurizer reads; it must
            hold the hub entry's network (default ``net``; ``""``: the whole module).
        curve: The learning-curve encoder.
        num_fresh_candidates: Fresh configurations scored per decision.
        num_startup_trials: Random configurations started before the searcher.
        max_paused_trials: Bound on paused trials (default unbounded).
        max_surrogate_rows: Cap on the surrogate's training rows.
        promotion_probability: Probability of continuing the best paused trial without the surrogate.
        pending: How the epochs other agents are training enter a decision's fit.
        fantasies: Posterior draws of ``pending="fantasies"``.
        surrogate_options: Extra surrogate arguments.
        featurizer_options: Extra featurizer arguments.
        prior: A prior file written by ``lightning-fms pretrain`` (stored as an absolute path; every agent
            reads it when it loads the study, and the study's record of its fingerprint must match).
    """

    space_file: str | None = None
    hub: str | None = None
    budget: int | None = None
    monitor: str | None = None
    mode: str | None = None
    max_epochs_per_trial: int | None = None
    seed: int | None = None
    searcher: str | None = None
    weights: str | None = None
    weights_attribute: str | None = None
    curve: str | None = None
    num_fresh_candidates: int | None = None
    num_startup_trials: int | None = None
    max_paused_trials: int | None = None
    max_surrogate_rows: int | None = None
    promotion_probability: float | None = None
    pending: str | None = None
    fantasies: int | None = None
    surrogate_options: dict[str, Any] | None = None
    featurizer_options: dict[str, Any] | None = None
    prior: str | None = None


#: The study options an agent takes (:class:`AgentSettings` less ``space_file`` and ``hub``), stored with the study.
AGENT_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(AgentSettings) if f.name not in ("space_file", "hub"))
#: What the agent stores with the study: :data:`AGENT_OPTIONS` and the hub.
_STORED = ("hub", *AGENT_OPTIONS)


def _stored(stored: dict[str, Any], name: str) -> Any:
    """A stored setting (a study created before the setting existed has the declared default)."""
    if name in stored:
        return stored[name]
    return None if name == "hub" else declared_default(name)


class StudyAgent:
    """One agent process: claims an epoch, runs the user's command, tells the study; until the budget is spent.

    Args:
        study_dir: The study directory (created on first use).
        command: The user's command (``python my_finetune.py ...``).
        settings: Study settings (needed by the agent that creates the study; checked against the stored ones).
        poll_s: How long to wait when every trainable trial is running in another agent.
        echo: Print one line per trained epoch to stderr.
    """

    def __init__(
        self,
        study_dir: str | os.PathLike[str],
        command: Sequence[str],
        settings: AgentSettings | None = None,
        *,
        poll_s: float = 0.5,
        echo: bool = True,
    ) -> None:
        if not command:
            raise FMSError("give the training command after '--' (e.g. -- python train.py)")
        self.study = StudyDirectory(study_dir)
        self.command = list(command)
        self.settings = settings or AgentSettings()
        for name in ("prior", "hub"):  # stored for the other agents, who may run elsewhere
            value = getattr(self.settings, name)
            if value is not None:
                self.settings = replace(self.settings, **{name: str(Path(value).expanduser().absolute())})
        self.poll_s = poll_s
        self.echo = echo
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.trained: list[tuple[int, int]] = []
        self.snapshots = WeightSnapshots(self.study.weights_dir)
        self._hub: ModelHub | None = None
        self._modules: StudyModules | None = None
        self._runner: CommandRunner | None = None
        self._kept_pretrained = False

    # ------------------------------------------------------------------ state
    def _load(self) -> tuple[FreezeThawOptimizer, StudyLedger]:
        """The optimizer and the ledger of the persisted study (creating the study if there is none)."""
        state = self.study.load_state()
        if state is None:
            optimizer, ledger = self._create()
            self._keep_pretrained(optimizer)
            ledger.save(optimizer)
            return optimizer, ledger
        if "agent" not in state:
            raise FMSError(
                f"study directory {self.study.path} holds a study of lightning-fms tune; agents cannot join it"
            )
        section = state["agent"]
        stored = section["settings"]
        self._check_settings(state, stored)
        optimizer = self._optimizer(SearchSpace.from_dict(state["settings"]["space"]), stored)
        optimizer.load_state_dict(state)
        self._keep_pretrained(optimizer)
        ledger = self._ledger(stored, optimizer)
        ledger.load_state_dict(section)
        return optimizer, ledger

    def _ledger(self, stored: dict[str, Any], optimizer: FreezeThawOptimizer) -> StudyLedger:
        hub = self._model_hub(stored)
        return StudyLedger(
            self.study,
            monitor=stored["monitor"],
            mode=stored["mode"],
            section="agent",
            settings=stored,
            families={entry.name: entry.family for entry in hub} if hub is not None else None,
            snapshots=self.snapshots if optimizer.searcher.uses_weights else None,
        )

    def _model_hub(self, stored: dict[str, Any]) -> ModelHub | None:
        """The study's model hub (read once), or ``None`` without one."""
        path = _stored(stored, "hub")
        if path is None:
            return None
        if self._hub is None:
            self._hub = ModelHub.from_yaml(path)
        return self._hub

    def _create(self) -> tuple[FreezeThawOptimizer, StudyLedger]:
        given = self.settings
        if given.space_file is None:
            raise FMSError(f"study directory {self.study.path} holds no study yet: give --space to create it")
        if given.budget is None:
            raise FMSError(f"study directory {self.study.path} holds no study yet: give --budget to create it")
        stored: dict[str, Any] = {"hub": given.hub}
        hub = self._model_hub(stored)
        space_file = read_space_file(given.space_file, hub_entries=hub.names if hub is not None else None)
        monitor = given.monitor or space_file.monitor
        if not monitor:
            raise FMSError("give --monitor (the metric the script logs at validation)")
        for name in AGENT_OPTIONS:
            value = getattr(given, name)
            stored[name] = declared_default(name) if value is None else value
        stored.update(monitor=monitor, mode=given.mode or space_file.mode or FALLBACK_MODE)
        optimizer = self._optimizer(space_file.space, stored)
        return optimizer, self._ledger(stored, optimizer)

    def _check_settings(self, state: dict[str, Any], stored: dict[str, Any]) -> None:
        given = self.settings
        for key in _STORED:
            value = getattr(given, key)
            if value is not None and value != _stored(stored, key):
                raise FMSError(
                    f"the study in {self.study.path} has {key}={_stored(stored, key)!r}, not {value!r}; "
                    "leave it out to join, or use a new --study_dir"
                )
        if given.space_file is not None:
            hub = self._model_hub(stored)
            space = read_space_file(given.space_file, hub_entries=hub.names if hub is not None else None).space
            if space.to_dict() != state["settings"]["space"]:
                raise FMSError(f"the study in {self.study.path} has another search space; use a new --study_dir")

    def _study_modules(self, space: SearchSpace, hub: ModelHub | None) -> StudyModules:
        """The featurizer's modules: each hub entry's network from the hub (``W_0``), each epoch's from its snapshot."""
        if self._modules is None:

            def pretrained(entry: str | None) -> Any:
                return hub.build(str(entry)) if hub is not None and entry is not None else None

            self._modules = StudyModules(space, pretrained, self.snapshots)
        return self._modules

    def _optimizer(self, space: SearchSpace, stored: dict[str, Any]) -> FreezeThawOptimizer:
        hub = self._model_hub(stored)
        if space.hub_key is not None and hub is None:
            raise FMSError(
                f"the space's hub choice {space.hub_key!r} needs --hub (the model hub YAML whose entries it picks)"
            )
        if hub is not None and space.hub_key is None:
            raise FMSError("--hub needs a hub choice in the space (e.g. 'model.pretrained: {type: hub}')")
        cap = int(stored["max_epochs_per_trial"])
        modules = self._study_modules(space, hub)
        searcher = seeded_searcher(
            stored["searcher"],
            space,
            cap,
            seed=derive_seed(int(stored["seed"]), "searcher"),
            modules=modules,
            weights=_stored(stored, "weights"),
            curve=_stored(stored, "curve"),
            device="cpu",
            surrogate_options=_stored(stored, "surrogate_options"),
            featurizer_options=_stored(stored, "featurizer_options"),
            promotion_probability=_stored(stored, "promotion_probability"),
            pending=_stored(stored, "pending"),
            fantasies=_stored(stored, "fantasies"),
            max_rows=_stored(stored, "max_surrogate_rows"),
            prior=_stored(stored, "prior"),
        )
        return FreezeThawOptimizer(
            space,
            searcher,
            budget=int(stored["budget"]),
            max_epochs_per_trial=cap,
            mode=stored["mode"],
            seed=int(stored["seed"]),
            num_fresh_candidates=_stored(stored, "num_fresh_candidates"),
            num_startup_trials=_stored(stored, "num_startup_trials"),
            max_paused_trials=_stored(stored, "max_paused_trials"),
            modules=modules if searcher.uses_weights else None,
        )

    def _keep_pretrained(self, optimizer: FreezeThawOptimizer) -> None:
        """Keep each hub entry's ``W_0`` in the study's snapshots once (when the study reads weights)."""
        if self._kept_pretrained or not optimizer.searcher.uses_weights or self._modules is None:
            return
        self._modules.store_pretrained(self._hub)
        self._kept_pretrained = True

    def _reap(self, optimizer: FreezeThawOptimizer) -> bool:
        """Give back running epochs whose agent process is gone; whether any was."""
        dead = [t for t, claimed in optimizer.running.items() if not _alive(claimed.owner)]
        for trial_id in dead:
            log.warning(
                "trial %d: its agent (pid %s) is gone; giving the epoch back",
                trial_id,
                optimizer.running[trial_id].owner.get("pid"),
            )
            optimizer.release(trial_id)
        return bool(dead)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Train epochs until the study's budget is spent; returns a summary.

        Raises:
            FMSError: bad settings, or a study directory that is not an agents' study.
        """
        self.study.join()
        try:
            while True:
                with self.study.critical():
                    optimizer, ledger = self._load()
                    changed = self._reap(optimizer)
                    suggestion = optimizer.claim(self.owner)
                    if suggestion is not None or changed:
                        ledger.save(optimizer)
                    resume = self._resume_path(ledger, suggestion)
                    others_running = bool(optimizer.running)
                    budget_left = optimizer.epochs_spent + len(optimizer.running) < optimizer.budget
                if suggestion is None:
                    if others_running and budget_left:
                        time.sleep(self.poll_s)  # every trainable trial is running elsewhere
                        continue
                    break
                try:
                    outcome = self._train(suggestion, resume, ledger)
                except BaseException:
                    with self.study.critical():
                        optimizer, ledger = self._load()
                        optimizer.release(suggestion.trial_id)
                        ledger.save(optimizer)
                    raise
                with self.study.critical():
                    optimizer, ledger = self._load()
                    self._finish(optimizer, ledger, suggestion, outcome)
            with self.study.critical():
                optimizer, ledger = self._load()
                if optimizer.is_done and not optimizer.running:
                    ledger.write_reports(optimizer, final=True)
            return self._summary(optimizer, ledger)
        finally:
            self.study.unlock()

    def _resume_path(self, ledger: StudyLedger, suggestion: Suggestion | None) -> Path | str | None:
        """The verified checkpoint to resume from, or why there is none (the epoch then fails)."""
        if suggestion is None or suggestion.kind != SuggestionKind.RESUME:
            return None
        try:
            return ledger.resume_checkpoint(suggestion.trial_id).resolve()
        except CheckpointError as error:
            return str(error)

    def _train(self, suggestion: Suggestion, resume: Path | str | None, ledger: StudyLedger) -> EpochOutcome:
        """Run the user's command for one epoch; what it reported (its checkpoint is on disk unless it failed)."""
        trial_id, epoch = suggestion.trial_id, suggestion.epoch
        if isinstance(resume, str):  # the checkpoint is missing or was modified
            return EpochOutcome(error=resume)
        stored = ledger.settings or {}
        if self._runner is None:
            assert self._modules is not None  # built by _load
            self._runner = CommandRunner(
                self.command,
                self.study.path,
                hub_key=self._modules.space.hub_key,
                hub=self._hub,
                weights_attribute=_stored(stored, "weights_attribute"),
            )
        job = EpochJob(
            trial_id=trial_id,
            config=suggestion.config,
            epoch=epoch,
            resume_from=resume,
            checkpoint_out=ledger.checkpoint_path(trial_id, epoch),
            log_dir=self.study.trial_dir(trial_id),
            seed=int(stored["seed"]),
            monitor=ledger.monitor,
            cap=int(stored["max_epochs_per_trial"]),
            record_weights=ledger.snapshots is not None,  # the study reads weights: the script's callback writes them
        )
        return self._runner.run_epoch(job)

    def _finish(
        self, optimizer: FreezeThawOptimizer, ledger: StudyLedger, suggestion: Suggestion, outcome: EpochOutcome
    ) -> None:
        """Commit the epoch through the ledger, unless it was given back meanwhile (this agent seemed dead)."""
        trial_id, epoch = suggestion.trial_id, suggestion.epoch
        claimed = optimizer.running.get(trial_id)
        if claimed is None or claimed.decision.epoch != epoch or dict(claimed.owner) != self.owner:
            log.warning("trial %d epoch %d was given back meanwhile; its result is dropped", trial_id, epoch)
            return
        ledger.commit(optimizer, trial_id, epoch, outcome, claimed=True)  # the weights go to the snapshots
        self.trained.append((trial_id, epoch))
        if self.echo:
            status = f"failed: {optimizer.trials[trial_id].error}" if outcome.error else f"{outcome.value:.4g}"
            print(
                f"lightning-fms agent {os.getpid()}: trial {trial_id} epoch {epoch}: {status} "
                f"({optimizer.epochs_spent}/{optimizer.budget} epochs)",
                file=sys.stderr,
                flush=True,
            )

    def _summary(self, optimizer: FreezeThawOptimizer, ledger: StudyLedger) -> dict[str, Any]:
        best = optimizer.best()
        return {
            "best_trial": best.trial_id if best else None,
            "best_epoch": best.epoch if best else None,
            "best_value": best.value if best else None,
            "best_config": dict(optimizer.trials[best.trial_id].config) if best else None,
            "best_checkpoint": str(ledger.best_checkpoint) if ledger.best_checkpoint else None,
            "epochs_spent": optimizer.epochs_spent,
            "epochs_trained_here": len(self.trained),
            "results": str(self.study.path / "results.json"),
        }


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the agent that owns a running epoch still runs (agents on other hosts are assumed alive)."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
