"""The study directory: one owner at a time, state written atomically, checkpoints verified.

Layout::

    <study_dir>/
      .lock              held (flock) by the tuner that owns the study
      state.pt           the authoritative state (tensors, lists, dicts, scalars; read with weights_only=True)
      study.json         the same state as readable JSON (informational, rewritten with state.pt)
      results.json, trajectory.csv, regret.png
      best.ckpt          checkpoint of the best epoch so far
      trials/<id>/       last.ckpt (the trial's newest checkpoint), logs/ (Lightning CSV logs)
      weights/           weight snapshots for the featurizer (safetensors)

A write goes to a temporary file that is flushed, synced and renamed over the old one, so a process
killed at any moment leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from lightning_fms.errors import CheckpointError, FMSError, StudyLockedError
from lightning_fms.search.trial import to_score


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Text form of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode())


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class StudyDirectory:
    """Owns a study directory: the lock, the state file and the paths inside.

    Args:
        path: The study directory (created if missing).
    """

    STATE_FILE = "state.pt"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._lock_handle: io.TextIOWrapper | None = None

    # ------------------------------------------------------------------ lock
    def lock(self) -> None:
        """Take the study for this process.

        Raises:
            StudyLockedError: another process holds it. The lock dies with its process, so a tuner
                killed with SIGKILL never leaves a stale lock.
            FMSError: the directory cannot be created.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise FMSError(f"cannot create study directory {self.path}: {error.strerror}") from None
        handle = open(self.path / ".lock", "a+")
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

    def unlock(self) -> None:
        """Release the lock (also released when the process dies)."""
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self) -> StudyDirectory:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    # ------------------------------------------------------------------ state
    def save_state(self, state: dict[str, Any]) -> None:
        """Persist ``state`` atomically (plus a readable ``study.json``)."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.path / self.STATE_FILE, buffer.getvalue())
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
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"refused to load {path}: it contains pickled code") from None
        except Exception as error:
            raise CheckpointError(f"study state {path} is unreadable ({type(error).__name__})") from None

    # ------------------------------------------------------------------ paths
    def trial_dir(self, trial_id: int) -> Path:
        """Directory of one trial."""
        return self.path / "trials" / f"{trial_id:04d}"

    def checkpoint_path(self, trial_id: int) -> Path:
        """The trial's newest checkpoint."""
        return self.trial_dir(trial_id) / "last.ckpt"

    @property
    def best_checkpoint_path(self) -> Path:
        """Copy of the checkpoint of the best epoch so far."""
        return self.path / "best.ckpt"

    @property
    def weights_dir(self) -> Path:
        """Where weight snapshots for the featurizer live."""
        return self.path / "weights"

    def keep_if_best(
        self, best: dict[str, Any] | None, checkpoint: Path, trial_id: int, epoch: int, value: float, mode: str
    ) -> dict[str, Any] | None:
        """Copy ``checkpoint`` to ``best.ckpt`` when ``value`` beats ``best``.

        Returns:
            The best record after this epoch: ``{"trial", "epoch", "value"}`` (``best`` when not beaten).
        """
        if best is not None and to_score(value, mode) <= to_score(best["value"], mode):
            return best
        if not math.isfinite(value):
            return best
        atomic_write_bytes(self.best_checkpoint_path, checkpoint.read_bytes())
        return {"trial": trial_id, "epoch": epoch, "value": value}

    def delete_checkpoints_except(self, trial_id: int, keep: Path | None) -> None:
        """Delete the trial's checkpoint files other than ``keep`` (all of them when ``keep`` is None)."""
        trial_dir = self.trial_dir(trial_id)
        if not trial_dir.exists():
            return
        for path in trial_dir.glob("*.ckpt"):
            if keep is None or path != keep:
                path.unlink(missing_ok=True)

    def verify_checkpoint(self, path: Path, sha256: str | None) -> None:
        """Check that a checkpoint is the one the study wrote.

        Raises:
            CheckpointError: missing, or its content changed since it was written.
        """
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} is missing")
        if sha256 is not None and file_sha256(path) != sha256:
            raise CheckpointError(f"checkpoint {path} was modified after the study wrote it (sha256 mismatch)")
