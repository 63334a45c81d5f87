"""``lightning-fms agent``: run the user's own training command once per decision, in several processes at once.

::

    lightning-fms agent --study_dir runs/s1 --space space.yaml --budget 30 --monitor val_acc
        -- python my_finetune.py fit --config my.yaml

Each decision the agent runs the command with the trial's values appended as ``--key=value`` (the space's
names, e.g. ``--model.lr=0.01``, which a LightningCLI script accepts as it is), ``--ckpt_path=<checkpoint>``
when it resumes a paused trial, and the environment variables of :mod:`lightning_fms.training.callback`. The
script's only change is ``FMSCheckpointCallback()`` in its Trainer's callbacks: it stops the run after the
epoch the study paid for, saves the trial checkpoint and writes a small result file that the agent tells
the study.

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

import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from lightning_fms.errors import CheckpointError, FMSError
from lightning_fms.options import FALLBACK_MODE, declared_default
from lightning_fms.search.optimizer import FreezeThawOptimizer, Suggestion, SuggestionKind
from lightning_fms.search.searcher import seeded_searcher
from lightning_fms.search.seeds import derive_seed
from lightning_fms.search.space import SearchSpace
from lightning_fms.study.directory import StudyDirectory
from lightning_fms.study.ledger import StudyLedger
from lightning_fms.sweep import read_space_file
from lightning_fms.training.callback import (
    ENV_CHECKPOINT,
    ENV_EPOCH,
    ENV_MONITOR,
    ENV_RESULT,
    ENV_RESUME,
    ENV_STUDY_DIR,
    ENV_TRIAL,
)
from lightning_fms.training.executor import EpochOutcome

__all__ = ["AGENT_OPTIONS", "AgentSettings", "StudyAgent", "command_line"]

log = logging.getLogger(__name__)


@dataclass
class AgentSettings:
    """Study settings given to an agent; ``None`` means "as stored" (required when the agent creates the study).

    Every field but ``space_file`` is an option of :class:`~lightning_fms.options.StudyOptions` (the
    ``lightning-fms agent`` flags are generated from there, with their help); a new study takes the declared
    default of each one left out, except ``budget`` and ``monitor`` (required) and ``mode`` (the space file's
    goal, else ``"max"``).

    Attributes:
        space_file: Search-space file (the recipe's ``space`` format or a W&B sweep).
        budget: Total epochs over all trials.
        monitor: The metric the script logs at validation (default: the space file's).
        mode: ``"max"`` or ``"min"`` (default: the space file's, else ``"max"``).
        max_epochs_per_trial: Per-trial epoch cap.
        seed: Seed of the decisions.
        searcher: One of :data:`~lightning_fms.search.searcher.SEARCHERS`.
        max_paused_trials: Bound on paused trials (default unbounded).
        prior: A prior file written by ``lightning-fms pretrain`` (stored as an absolute path; every agent
            reads it when it loads the study, and the study's record of its fingerprint must match).
    """

    space_file: str | None = None
    budget: int | None = None
    monitor: str | None = None
    mode: str | None = None
    max_epochs_per_trial: int | None = None
    seed: int | None = None
    searcher: str | None = None
    max_paused_trials: int | None = None
    prior: str | None = None


#: The study options an agent takes (:class:`AgentSettings` less ``space_file``), stored with the study.
AGENT_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(AgentSettings) if f.name != "space_file")


def command_line(command: Sequence[str], config: dict[str, Any], resume: Path | None) -> list[str]:
    """The user's command plus ``--key=value`` per configuration value and ``--ckpt_path=...`` when resuming."""
    out = [*command, *(f"--{key}={_cli_value(value)}" for key, value in config.items())]
    if resume is not None:
        out.append(f"--ckpt_path={resume}")
    return out


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


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
        if self.settings.prior is not None:  # stored for the other agents, who may run elsewhere
            self.settings = replace(self.settings, prior=str(Path(self.settings.prior).expanduser().absolute()))
        self.poll_s = poll_s
        self.echo = echo
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.trained: list[tuple[int, int]] = []

    # ------------------------------------------------------------------ state
    def _load(self) -> tuple[FreezeThawOptimizer, StudyLedger]:
        """The optimizer and the ledger of the persisted study (creating the study if there is none)."""
        state = self.study.load_state()
        if state is None:
            optimizer, ledger = self._create()
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
        ledger = self._ledger(stored)
        ledger.load_state_dict(section)
        return optimizer, ledger

    def _ledger(self, stored: dict[str, Any]) -> StudyLedger:
        return StudyLedger(self.study, monitor=stored["monitor"], mode=stored["mode"], section="agent", settings=stored)

    def _create(self) -> tuple[FreezeThawOptimizer, StudyLedger]:
        given = self.settings
        if given.space_file is None:
            raise FMSError(f"study directory {self.study.path} holds no study yet: give --space to create it")
        if given.budget is None:
            raise FMSError(f"study directory {self.study.path} holds no study yet: give --budget to create it")
        space_file = read_space_file(given.space_file)
        monitor = given.monitor or space_file.monitor
        if not monitor:
            raise FMSError("give --monitor (the metric the script logs at validation)")
        stored = {name: getattr(given, name) for name in AGENT_OPTIONS}
        for name, value in stored.items():
            if value is None:
                stored[name] = declared_default(name)
        stored.update(monitor=monitor, mode=given.mode or space_file.mode or FALLBACK_MODE)
        return self._optimizer(space_file.space, stored), self._ledger(stored)

    def _check_settings(self, state: dict[str, Any], stored: dict[str, Any]) -> None:
        given = self.settings
        for key in AGENT_OPTIONS:
            value = getattr(given, key)
            if value is not None and value != stored.get(key):
                raise FMSError(
                    f"the study in {self.study.path} has {key}={stored.get(key)!r}, not {value!r}; "
                    "leave it out to join, or use a new --study_dir"
                )
        if given.space_file is not None:
            space = read_space_file(given.space_file).space
            if space.to_dict() != state["settings"]["space"]:
                raise FMSError(f"the study in {self.study.path} has another search space; use a new --study_dir")

    def _optimizer(self, space: SearchSpace, stored: dict[str, Any]) -> FreezeThawOptimizer:
        if space.hub_key is not None:
            raise FMSError("agents take no model hub: give the weight files as a plain categorical parameter")
        cap = int(stored["max_epochs_per_trial"])
        seed = derive_seed(int(stored["seed"]), "searcher")
        searcher = seeded_searcher(
            stored["searcher"], space, cap, seed=seed, weights="none", device="cpu", prior=stored.get("prior")
        )
        return FreezeThawOptimizer(
            space,
            searcher,
            budget=int(stored["budget"]),
            max_epochs_per_trial=cap,
            mode=stored["mode"],
            seed=int(stored["seed"]),
            max_paused_trials=stored.get("max_paused_trials"),
        )

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
        trial_dir = self.study.trial_dir(trial_id)
        trial_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = ledger.checkpoint_path(trial_id, epoch)
        result = trial_dir / f"epoch-{epoch}.json"
        for stale in (checkpoint, result):
            stale.unlink(missing_ok=True)
        env = {
            **os.environ,
            ENV_STUDY_DIR: str(self.study.path.resolve()),
            ENV_TRIAL: str(trial_id),
            ENV_EPOCH: str(epoch),
            ENV_RESUME: str(resume) if resume is not None else "",
            ENV_RESULT: str(result.resolve()),
            ENV_MONITOR: ledger.monitor,
            ENV_CHECKPOINT: str(checkpoint.resolve()),
        }
        argv = command_line(self.command, suggestion.config, resume)
        start = time.perf_counter()
        stderr_path = trial_dir / f"epoch-{epoch}.stderr"
        with open(trial_dir / f"epoch-{epoch}.stdout", "wb") as out, open(stderr_path, "wb") as err:
            try:
                code = subprocess.run(argv, stdout=out, stderr=err, env=env, check=False).returncode
            except OSError as error:
                return EpochOutcome(
                    error=f"cannot run {argv[0]!r}: {error.strerror}", wall_s=time.perf_counter() - start
                )
        wall_s = time.perf_counter() - start
        if code != 0:
            return EpochOutcome(
                error=_last_line(stderr_path) or f"the command exited with status {code}", wall_s=wall_s
            )
        if not result.exists():
            return EpochOutcome(
                error="the command wrote no result: add FMSCheckpointCallback() to its Trainer's callbacks",
                wall_s=wall_s,
            )
        data = json.loads(result.read_text())
        if data.get("error"):
            return EpochOutcome(error=str(data["error"]), wall_s=wall_s)
        if int(data.get("epoch", 0)) != epoch:
            return EpochOutcome(
                error=f"the run ended at epoch {data.get('epoch')}, not {epoch} "
                "(is the Trainer's max_epochs too small?)",
                wall_s=wall_s,
            )
        if not checkpoint.exists():
            return EpochOutcome(error=f"the run saved no checkpoint at {checkpoint}", wall_s=wall_s)
        value = data.get("value")
        return EpochOutcome(value=float(value) if value is not None else math.nan, wall_s=wall_s)

    def _finish(
        self, optimizer: FreezeThawOptimizer, ledger: StudyLedger, suggestion: Suggestion, outcome: EpochOutcome
    ) -> None:
        """Commit the epoch through the ledger, unless it was given back meanwhile (this agent seemed dead)."""
        trial_id, epoch = suggestion.trial_id, suggestion.epoch
        claimed = optimizer.running.get(trial_id)
        if claimed is None or claimed.decision.epoch != epoch or dict(claimed.owner) != self.owner:
            log.warning("trial %d epoch %d was given back meanwhile; its result is dropped", trial_id, epoch)
            return
        ledger.commit(optimizer, trial_id, epoch, outcome, claimed=True)
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


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""
