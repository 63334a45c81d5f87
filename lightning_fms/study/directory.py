"""The study directory: who may use it (locks), the state file, and the paths inside.

Layout::

    <study_dir>/
      .lock              flock: held exclusively by ``lightning-fms tune``, shared by every ``lightning-fms agent``
      .agents.lock       flock: the agents' short critical section (load state → choose/record → save state)
      state.pt           the authoritative state (tensors, lists, dicts, scalars; read with weights_only=True;
                         the decision log as blocks of JSON text, see lightning_fms.study.decision_blocks)
      study.json         the same state as readable JSON (informational, rewritten with state.pt)
      results.json, trajectory.csv, regret.png
      best.ckpt          checkpoint of the best epoch so far
      trials/<id>/       epoch-<k>.ckpt (a paused trial's newest checkpoint), logs/ (Lightning CSV logs)
      weights/           weight snapshots for the featurizer (safetensors): trial-<id>-<epoch>, hub-<entry>

Every file is written with :mod:`lightning_fms.atomic`, so a process killed at any moment leaves
either the old or the new file, never a torn one. Which checkpoints exist is the ledger's business
(:mod:`lightning_fms.study.ledger`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from lightning_fms.atomic import atomic_output, atomic_write_text, sha256_file
from lightning_fms.errors import CheckpointError, FMSError, StudyLockedError
from lightning_fms.study.decision_blocks import BLOCKS_KEY, DECISIONS_KEY, DecisionBlocks, decode_decisions

__all__ = ["StudyDirectory"]

STUDY_LOCK = ".lock"
AGENTS_LOCK = ".agents.lock"


class StudyDirectory:
    """Owns a study directory: its locks, the state file and the paths inside.

    Args:
        path: The study directory (created when it is first locked or joined).
    """

    STATE_FILE = "state.pt"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._lock_handle: IO[str] | None = None
        self._decision_blocks = DecisionBlocks()

    # ------------------------------------------------------------------ locks
    def _open_lock(self) -> IO[str]:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise FMSError(f"cannot create study directory {self.path}: {error.strerror}") from None
        return open(self.path / STUDY_LOCK, "a+")  # noqa: SIM115 - held until unlock()

    def lock(self) -> None:
        """Take the study for this process alone (``lightning-fms tune``).

        Raises:
            StudyLockedError: another process holds it (a tuner, or agents). The lock dies with its
                process, so a tuner killed with SIGKILL never leaves a stale lock.
            FMSError: the directory cannot be created.
        """
        handle = self._open_lock()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise StudyLockedError(
                f"study directory {self.path} is in use by another tuner (pid {owner}); "
                "wait for it or use another --study_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle

    def join(self) -> None:
        """Share the study with other agents for this process's whole run (``lightning-fms agent``).

        Raises:
            FMSError: a tuner holds the study exclusively, or the directory cannot be created.
        """
        handle = self._open_lock()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FMSError(
                f"study directory {self.path} is in use by lightning-fms tune; agents cannot join it"
            ) from None
        self._lock_handle = handle

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` or :meth:`join` (also released when the process dies)."""
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """The agents' critical section: one agent at a time loads, changes and saves the state inside it."""
        with open(self.path / AGENTS_LOCK, "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def __enter__(self) -> StudyDirectory:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    # ------------------------------------------------------------------ state
    def save_state(self, state: dict[str, Any], readable: bool = True) -> None:
        """Persist ``state`` atomically, plus the readable ``study.json`` unless ``readable`` is false.

        ``study.json`` is informational; writing it costs more than ``state.pt`` itself (JSON of every decision),
        so a caller that saves many times a second may write it less often (see
        :attr:`~lightning_fms.study.ledger.StudyLedger.report_interval_s`).
        """
        stored = dict(state)
        if DECISIONS_KEY in stored:  # blocks of JSON text, the unchanged ones written once (study/decision_blocks.py)
            stored[BLOCKS_KEY] = self._decision_blocks.encode(stored.pop(DECISIONS_KEY))
        with atomic_output(self.path / self.STATE_FILE) as tmp:
            torch.save(stored, tmp)
        if readable:
            self.save_readable(state)

    def save_readable(self, state: dict[str, Any]) -> None:
        """Rewrite ``study.json``, the readable copy of ``state`` (settings, trials, decisions, epochs, tuner)."""
        readable = {k: v for k, v in state.items() if k in ("settings", "trials", "decisions", "epochs_spent", "tuner")}
        atomic_write_text(self.path / "study.json", json.dumps(readable, indent=1, default=str))

    def load_state(self) -> dict[str, Any] | None:
        """The persisted state, or ``None`` for a new study.

        Raises:
            CheckpointError: the state file is unreadable or would run code.
        """
        path = self.path / self.STATE_FILE
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and BLOCKS_KEY in state:
                state[DECISIONS_KEY] = decode_decisions(state.pop(BLOCKS_KEY))
            return state
        except pickle.UnpicklingError:
            raise CheckpointError(f"refused to load {path}: it contains pickled code") from None
        except Exception as error:
            raise CheckpointError(f"study state {path} is unreadable ({type(error).__name__})") from None

    # ------------------------------------------------------------------ paths
    def trial_dir(self, trial_id: int) -> Path:
        """Directory of one trial."""
        return self.path / "trials" / f"{trial_id:04d}"

    @property
    def best_checkpoint_path(self) -> Path:
        """Copy of the checkpoint of the best epoch so far."""
        return self.path / "best.ckpt"

    @property
    def weights_dir(self) -> Path:
        """Where weight snapshots for the featurizer live."""
        return self.path / "weights"

    def delete_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of interrupted atomic writes (``.<name>.*tmp``) in the study; the deleted.

        Only for the process that holds the study alone (:meth:`lock`): any such file was left by a process that
        died mid-write.
        """
        deleted = []
        folders = [self.path, self.path / "trials", self.weights_dir]
        trials = self.path / "trials"
        if trials.is_dir():
            folders += [d for d in trials.iterdir() if d.is_dir()]
        for folder in folders:
            if not folder.is_dir():
                continue
            for path in folder.glob(".*tmp"):
                if path.is_file():
                    path.unlink(missing_ok=True)
                    deleted.append(path)
        return deleted

    def verify_checkpoint(self, path: Path, sha256: str | None) -> None:
        """Check that a checkpoint is the one the study wrote.

        Raises:
            CheckpointError: missing, or its content changed since it was written.
        """
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} is missing")
        if sha256 is not None and sha256_file(path) != sha256:
            raise CheckpointError(f"checkpoint {path} was modified after the study wrote it (sha256 mismatch)")
