"""Offline W&B for the logger tests, and the one reader of what an offline run recorded.

Why the tests read W&B's private format: an offline run (``WANDB_MODE=offline``) writes nothing public to read
back. There is no export, the public API (``wandb.Api``) reads from a server only, and ``wandb sync`` uploads to
one. The run's ``offline-run-*/run-<id>.wandb`` file is the only record of what a real offline run logged, so the
tests parse it, here and nowhere else.

If a W&B release changes that format, this module is what to update:

- the framing (:func:`_records`): a LevelDB-style log, a 7-byte file header starting ``:W&B``, then 32 KiB blocks
  of chunks, each with a 7-byte header (CRC32, little-endian length, kind: 1 full, 2 first, 3 middle, 4 last);
- the messages (:func:`_read_runs`): ``wandb.proto.wandb_internal_pb2.Record`` and the fields read from its
  ``run``, ``config``, ``history``, ``summary``, ``metric`` and ``exit`` records.

A release that moves or renames those makes these tests fail (an import error or no runs found), never skip.
"""

from __future__ import annotations

import glob
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import DecodeError

_BLOCK = 32768  # bytes per block of the log
_HEADER = 7  # bytes of the file header and of each chunk header
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4  # chunk kinds


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> Path:
    """Offline W&B with every directory it writes to under tmp_path (never a server, never $HOME)."""
    pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # runs then go to the study directory
    return home


@pytest.fixture
def read_offline_runs(wandb_env) -> Callable[..., list[dict[str, Any]]]:
    """``read_offline_runs(root, timeout=30.0) -> list[dict]``: every offline run under ``root``, one dict each.

    Each dict holds ``dir`` (the run's folder), ``id``, ``group``, ``job_type``, ``name``, ``project``, ``config``
    (W&B's own ``_wandb`` key dropped), ``history`` (one dict per logged row), ``summary``, ``metrics`` (the
    ``(name or glob, step metric)`` definitions) and ``exit`` (the exit code).
    """
    return _read_runs


def _records(path: Path) -> Iterator[Any]:
    """The protobuf ``Record`` messages of one ``run-<id>.wandb`` file, in the order written."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} does not start with W&B's header"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:  # too little left in the block for a chunk header: the block's tail is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + _HEADER + length > len(data):  # a chunk the service is still writing
            break
        chunk, pos = data[pos + _HEADER : pos + _HEADER + length], pos + _HEADER + length
        if kind == _FULL:
            yield pb.Record.FromString(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pb.Record.FromString(pending + chunk)
        else:  # zeros past the last chunk
            break


def _items(updates) -> dict[str, Any]:
    return {(".".join(item.nested_key) or item.key): json.loads(item.value_json) for item in updates}


def _read_runs(root: Path, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Every offline run under ``root`` (see the ``read_offline_runs`` fixture).

    W&B's service writes the files asynchronously: wait until each holds its exit record.
    """
    paths = sorted(glob.glob(str(Path(root) / "**" / "offline-run-*" / "run-*.wandb"), recursive=True))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(any(r.WhichOneof("record_type") == "exit" for r in _records(p)) for p in paths):
                break
        except DecodeError:  # read while the service was writing a record: not finished yet
            pass
        time.sleep(0.2)
    runs = []
    for path in paths:
        run = {"dir": Path(path).parent, "history": [], "summary": {}, "config": {}, "metrics": [], "exit": None}
        for record in _records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run.update(id=r.run_id, group=r.run_group, job_type=r.job_type, name=r.display_name, project=r.project)
                run["config"].update(_items(r.config.update))
            elif kind == "config":
                run["config"].update(_items(record.config.update))
            elif kind == "history":
                run["history"].append(_items(record.history.item))
            elif kind == "summary":
                run["summary"].update(_items(record.summary.update))
            elif kind == "metric":
                m = record.metric
                run["metrics"].append((m.name or m.glob_name, m.step_metric))
            elif kind == "exit":
                run["exit"] = record.exit.exit_code
        run["config"].pop("_wandb", None)
        runs.append(run)
    return runs
