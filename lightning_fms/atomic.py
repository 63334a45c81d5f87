"""Atomic files and file hashes: the one way lightning_fms writes a file that a crash must not tear.

A write goes to a temporary file next to the target (``.<name>.<pid>.tmp``), which is synced, renamed over
the target, and then the folder is synced. A process killed at any moment leaves the old content or the
new one, never a mix, and once the folder is synced the rename survives a power loss as well. Any writer
can produce the content (``torch.save``, safetensors, ``Trainer.save_checkpoint``): :func:`atomic_output`
hands it the temporary path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from lightning_fms.errors import CheckpointError

__all__ = [
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_text",
    "replace_atomically",
    "sha256_file",
    "temporary_path",
]

_CHUNK = 1 << 20


def temporary_path(path: str | os.PathLike[str], per_process: bool = True) -> Path:
    """Where the new content of ``path`` is written before it replaces ``path``.

    Args:
        path: The target file.
        per_process: Put the process id in the name, so that processes writing the same target at once never
            share a temporary file. ``False`` gives every process the same name (for writers that must agree
            on it, such as the ranks of one distributed ``Trainer.save_checkpoint``).
    """
    path = Path(path)
    suffix = f".{os.getpid()}.tmp" if per_process else ".tmp"
    return path.with_name(f".{path.name}{suffix}")


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_directory(path: Path) -> None:
    # some file systems refuse to sync a directory; the rename is still atomic there, only not yet durable
    with contextlib.suppress(OSError):
        _fsync_file(path)


def replace_atomically(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Sync the finished temporary file ``tmp``, rename it over ``path`` and sync ``path``'s folder."""
    tmp, path = Path(tmp), Path(path)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], per_process: bool = True) -> Iterator[Path]:
    """A temporary path to write the new content of ``path`` to; it replaces ``path`` when the block ends.

    The folder is created if missing. When the block raises, the temporary file is removed and ``path`` is
    left as it was.

    Example::

        with atomic_output(study / "state.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path, per_process)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    replace_atomically(tmp, path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Text (UTF-8) form of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode())


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's content (read in 1 MiB chunks).

    Raises:
        CheckpointError: the file does not exist or cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror}") from None
    return digest.hexdigest()
