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

import contextlib
import fcntl
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from lightning_fms.errors import CheckpointError, FMSError
from lightning_fms.options import declared_default
from lightning_fms.search.optimizer import FreezeThawOptimizer, Suggestion, SuggestionKind
from lightning_fms.search.searcher import build_searcher
from lightning_fms.search.seeds import derive_seed, seed_everything_quietly
from lightning_fms.search.space import SearchSpace
from lightning_fms.search.trial import TrialStatus
from lightning_fms.study.directory import StudyDirectory, file_sha256
from lightning_fms.study.reports import write_regret_plot, write_results, write_trajectory
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

__all__ = ["AGENT_OPTIONS", "AgentSettings", "StudyAgent", "command_line"]

log = logging.getLogger(__name__)

AGENTS_LOCK = ".agents.lock"
STUDY_LOCK = ".lock"


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
    """

    space_file: str | None = None
    budget: int | None = None
    monitor: str | None = None
    mode: str | None = None
    max_epochs_per_trial: int | None = None
    seed: int | None = None
    searcher: str | None = None
    max_paused_trials: int | None = None


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


@dataclass
class _Outcome:
    value: float
    error: str | None
    wall_s: float


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
        self.poll_s = poll_s
        self.echo = echo
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.trained: list[tuple[int, int]] = []
        self._study_lock: Any = None

    # ------------------------------------------------------------------ locks
    def _join(self) -> None:
        try:
            self.study.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise FMSError(f"cannot create study directory {self.study.path}: {error.strerror}") from None
        handle = open(self.study.path / STUDY_LOCK, "a+")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FMSError(
                f"study directory {self.study.path} is in use by lightning-fms tune; agents cannot join it"
            ) from None
        self._study_lock = handle

    def _leave(self) -> None:
        if self._study_lock is not None:
            fcntl.flock(self._study_lock.fileno(), fcntl.LOCK_UN)
            self._study_lock.close()
            self._study_lock = None

    @contextlib.contextmanager
    def _critical(self) -> Iterator[None]:
        with open(self.study.path / AGENTS_LOCK, "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ state
    def _load(self) -> tuple[FreezeThawOptimizer, dict[str, Any]]:
        """The optimizer and the agent section of the state (creating the study if it has none)."""
        state = self.study.load_state()
        if state is None:
            optimizer, agent = self._create()
            self._save(optimizer, agent)
            return optimizer, agent
        if "agent" not in state:
            raise FMSError(
                f"study directory {self.study.path} holds a study of lightning-fms tune; agents cannot join it"
            )
        agent = state["agent"]
        stored = agent["settings"]
        self._check_settings(state, stored)
        optimizer = self._optimizer(SearchSpace.from_dict(state["settings"]["space"]), stored)
        optimizer.load_state_dict(state)
        return optimizer, agent

    def _create(self) -> tuple[FreezeThawOptimizer, dict[str, Any]]:
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
        stored.update(monitor=monitor, mode=given.mode or space_file.mode or "max")
        optimizer = self._optimizer(space_file.space, stored)
        return optimizer, {"settings": stored, "checkpoints": {}, "best": None}

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
        with torch.random.fork_rng(devices=[]):
            seed_everything_quietly(derive_seed(int(stored["seed"]), "searcher"))
            searcher = build_searcher(stored["searcher"], space, cap, weights="none", device="cpu")
        return FreezeThawOptimizer(
            space,
            searcher,
            budget=int(stored["budget"]),
            max_epochs_per_trial=cap,
            mode=stored["mode"],
            seed=int(stored["seed"]),
            max_paused_trials=stored.get("max_paused_trials"),
        )

    def _save(self, optimizer: FreezeThawOptimizer, agent: dict[str, Any]) -> None:
        state = optimizer.state_dict()
        state["agent"] = agent
        self.study.save_state(state)

    def _reap(self, optimizer: FreezeThawOptimizer) -> bool:
        """Give back running epochs whose agent process is gone; whether any was."""
        dead = [t for t, r in optimizer.running.items() if not _alive(r.get("owner", {}))]
        for trial_id in dead:
            log.warning(
                "trial %d: its agent (pid %s) is gone; giving the epoch back",
                trial_id,
                optimizer.running[trial_id]["owner"].get("pid"),
            )
            optimizer.release(trial_id)
        return bool(dead)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Train epochs until the study's budget is spent; returns a summary.

        Raises:
            FMSError: bad settings, or a study directory that is not an agents' study.
        """
        self._join()
        try:
            while True:
                with self._critical():
                    optimizer, agent = self._load()
                    changed = self._reap(optimizer)
                    suggestion = optimizer.claim(self.owner)
                    if suggestion is not None or changed:
                        self._save(optimizer, agent)
                    resume = self._resume_path(agent, suggestion)
                    others_running = bool(optimizer.running)
                    budget_left = optimizer.epochs_spent + len(optimizer.running) < optimizer.budget
                if suggestion is None:
                    if others_running and budget_left:
                        time.sleep(self.poll_s)  # every trainable trial is running elsewhere
                        continue
                    break
                try:
                    outcome = self._train(suggestion, resume, agent["settings"]["monitor"])
                except BaseException:
                    with self._critical():
                        optimizer, agent = self._load()
                        optimizer.release(suggestion.trial_id)
                        self._save(optimizer, agent)
                    raise
                with self._critical():
                    optimizer, agent = self._load()
                    self._finish(optimizer, agent, suggestion, outcome)
            with self._critical():
                optimizer, agent = self._load()
                if optimizer.is_done and not optimizer.running:
                    write_regret_plot(self.study.path / "regret.png", optimizer, agent["settings"]["monitor"])
            return self._summary(optimizer, agent)
        finally:
            self._leave()

    def _resume_path(self, agent: dict[str, Any], suggestion: Suggestion | None) -> Path | str | None:
        if suggestion is None or suggestion.kind != SuggestionKind.RESUME:
            return None
        record = agent["checkpoints"].get(str(suggestion.trial_id))
        if record is None:
            return f"trial {suggestion.trial_id} has no checkpoint to resume from"
        path = (self.study.path / record["path"]).resolve()
        try:
            self.study.verify_checkpoint(path, record["sha256"])
        except CheckpointError as error:
            return str(error)
        return path

    def _train(self, suggestion: Suggestion, resume: Path | str | None, monitor: str) -> _Outcome:
        trial_id, epoch = suggestion.trial_id, suggestion.epoch
        if isinstance(resume, str):  # the checkpoint is missing or was modified
            return _Outcome(math.nan, resume, 0.0)
        trial_dir = self.study.trial_dir(trial_id)
        trial_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = trial_dir / f"epoch-{epoch}.ckpt"
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
            ENV_MONITOR: monitor,
            ENV_CHECKPOINT: str(checkpoint.resolve()),
        }
        argv = command_line(self.command, suggestion.config, resume)
        start = time.perf_counter()
        stderr_path = trial_dir / f"epoch-{epoch}.stderr"
        with open(trial_dir / f"epoch-{epoch}.stdout", "wb") as out, open(stderr_path, "wb") as err:
            try:
                code = subprocess.run(argv, stdout=out, stderr=err, env=env, check=False).returncode
            except OSError as error:
                return _Outcome(math.nan, f"cannot run {argv[0]!r}: {error.strerror}", time.perf_counter() - start)
        wall_s = time.perf_counter() - start
        if code != 0:
            return _Outcome(math.nan, _last_line(stderr_path) or f"the command exited with status {code}", wall_s)
        if not result.exists():
            return _Outcome(
                math.nan,
                "the command wrote no result: add FMSCheckpointCallback() to its Trainer's callbacks",
                wall_s,
            )
        data = json.loads(result.read_text())
        if data.get("error"):
            return _Outcome(math.nan, str(data["error"]), wall_s)
        if int(data.get("epoch", 0)) != epoch:
            return _Outcome(
                math.nan,
                f"the run ended at epoch {data.get('epoch')}, not {epoch} (is the Trainer's max_epochs too small?)",
                wall_s,
            )
        if not checkpoint.exists():
            return _Outcome(math.nan, f"the run saved no checkpoint at {checkpoint}", wall_s)
        value = data.get("value")
        return _Outcome(float(value) if value is not None else math.nan, None, wall_s)

    def _finish(
        self, optimizer: FreezeThawOptimizer, agent: dict[str, Any], suggestion: Suggestion, outcome: _Outcome
    ) -> None:
        trial_id, epoch = suggestion.trial_id, suggestion.epoch
        record = optimizer.running.get(trial_id)
        if record is None or record["epoch"] != epoch or record.get("owner") != self.owner:
            log.warning("trial %d epoch %d was given back meanwhile; its result is dropped", trial_id, epoch)
            return
        checkpoints: dict[str, dict[str, str]] = agent["checkpoints"]
        out = self.study.trial_dir(trial_id) / f"epoch-{epoch}.ckpt"
        if outcome.error is not None:
            stopped = optimizer.complete(trial_id, epoch, math.nan, outcome.wall_s, error=outcome.error)
            checkpoints.pop(str(trial_id), None)
        else:
            best = agent.get("best")
            agent["best"] = self.study.keep_if_best(best, out, trial_id, epoch, outcome.value, optimizer.mode)
            checkpoints[str(trial_id)] = {"path": str(out.relative_to(self.study.path)), "sha256": file_sha256(out)}
            stopped = optimizer.complete(trial_id, epoch, outcome.value, outcome.wall_s)
            if optimizer.trials[trial_id].status != TrialStatus.PAUSED:
                checkpoints.pop(str(trial_id), None)
        for other in stopped:
            checkpoints.pop(str(other), None)
        self._save(optimizer, agent)
        self.trained.append((trial_id, epoch))
        for touched in (trial_id, *stopped):
            self._delete_unreferenced(checkpoints, touched)
        self._write_reports(optimizer, agent)
        if self.echo:
            status = f"failed: {optimizer.trials[trial_id].error}" if outcome.error else f"{outcome.value:.4g}"
            print(
                f"lightning-fms agent {os.getpid()}: trial {trial_id} epoch {epoch}: {status} "
                f"({optimizer.epochs_spent}/{optimizer.budget} epochs)",
                file=sys.stderr,
                flush=True,
            )

    def _delete_unreferenced(self, checkpoints: dict[str, dict[str, str]], trial_id: int) -> None:
        keep = checkpoints.get(str(trial_id))
        self.study.delete_checkpoints_except(trial_id, self.study.path / keep["path"] if keep else None)

    def _write_reports(self, optimizer: FreezeThawOptimizer, agent: dict[str, Any]) -> None:
        monitor = agent["settings"]["monitor"]
        write_trajectory(self.study.path / "trajectory.csv", optimizer, {})
        best = self.study.best_checkpoint_path if agent.get("best") else None
        write_results(self.study.path / "results.json", optimizer, best_checkpoint=best, monitor=monitor, families={})

    def _summary(self, optimizer: FreezeThawOptimizer, agent: dict[str, Any]) -> dict[str, Any]:
        best = optimizer.best()
        return {
            "best_trial": best.trial_id if best else None,
            "best_epoch": best.epoch if best else None,
            "best_value": best.value if best else None,
            "best_config": dict(optimizer.trials[best.trial_id].config) if best else None,
            "best_checkpoint": str(self.study.best_checkpoint_path) if agent.get("best") else None,
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
