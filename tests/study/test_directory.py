"""The study directory: its locks, atomic writes, the state file and checksum refusal."""

import hashlib
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from lightning_fms.atomic import (
    atomic_output,
    atomic_write_bytes,
    atomic_write_text,
    sha256_file,
    temporary_path,
)
from lightning_fms.errors import CheckpointError, FMSError, StudyLockedError
from lightning_fms.study.directory import StudyDirectory

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # subprocesses import this tree


# ---------------------------------------------------------------------------------------------- locks
def test_a_tuner_and_agents_exclude_each_other(tmp_path):
    path = tmp_path / "study"
    agents = [StudyDirectory(path), StudyDirectory(path)]
    for agent in agents:
        agent.join()  # agents share the study
    tuner = StudyDirectory(path)
    with pytest.raises(StudyLockedError, match="in use by another tuner"):
        tuner.lock()
    agents[0].unlock()
    with pytest.raises(StudyLockedError):
        tuner.lock()  # one agent still holds it
    agents[1].unlock()
    tuner.lock()
    try:
        assert (path / ".lock").read_text() == str(os.getpid())
        with pytest.raises(FMSError, match="in use by lightning-fms tune; agents cannot join it"):
            StudyDirectory(path).join()
        with pytest.raises(StudyLockedError):
            StudyDirectory(path).lock()
    finally:
        tuner.unlock()
    with StudyDirectory(path):  # free again once released
        pass


def test_the_lock_dies_with_its_process(tmp_path):
    path = tmp_path / "study"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lightning_fms.study.directory import StudyDirectory; "
         "s = StudyDirectory(sys.argv[1]); s.lock(); print('held', flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StudyLockedError, match=f"pid {holder.pid}"):
            StudyDirectory(path).lock()
    finally:
        holder.kill()
        holder.wait()
    StudyDirectory(path).lock()  # SIGKILL left no stale lock


def test_critical_sections_run_one_at_a_time(tmp_path):
    path = tmp_path / "study"
    path.mkdir()
    events: list[str] = []
    inside = threading.Event()

    def first():
        with StudyDirectory(path).critical():
            events.append("first in")
            inside.set()
            time.sleep(0.3)
            events.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(5)
    with StudyDirectory(path).critical():  # waits for the other holder (flock per open file, threads too)
        events.append("second in")
    thread.join()
    assert events == ["first in", "first out", "second in"]


# ---------------------------------------------------------------------------------------------- atomic writes
def test_atomic_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    target = tmp_path / "sub" / "results.json"
    atomic_write_text(target, "old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".results.json.")
        torch.save({"x": torch.ones(2)}, tmp)
        assert target.read_bytes() == b"new"  # not replaced before the block ends
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(2))


def test_a_writer_that_fails_leaves_the_old_file(tmp_path):
    target = tmp_path / "state.pt"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_a_process_killed_while_writing_leaves_the_old_file(tmp_path):
    target = tmp_path / "state.pt"
    atomic_write_bytes(target, b"old content")
    script = textwrap.dedent(
        """
        import os, sys
        from lightning_fms.atomic import atomic_output
        with atomic_output(sys.argv[1]) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"torn")
                handle.flush()
                os._exit(9)  # killed mid-write
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, str(target)], env=ENV, check=False)
    assert proc.returncode == 9
    assert target.read_bytes() == b"old content"
    assert temporary_path(target).name not in {p.name for p in tmp_path.iterdir()}  # another process's name


def test_temporary_names_are_per_process_unless_asked(tmp_path):
    target = tmp_path / "epoch-1.ckpt"
    assert temporary_path(target).name == f".epoch-1.ckpt.{os.getpid()}.tmp"
    assert temporary_path(target, per_process=False).name == ".epoch-1.ckpt.tmp"
    assert not temporary_path(target).match("*.ckpt")  # never mistaken for a checkpoint when pruning


# ---------------------------------------------------------------------------------------------- state and hashes
def test_state_round_trip_and_pickled_code_is_refused(tmp_path):
    study = StudyDirectory(tmp_path / "study")
    assert study.load_state() is None
    state = {"version": 1, "trials": [{"id": 0}], "decisions": [], "epochs_spent": 0, "tuner": {"best": None}}
    study.save_state(state)
    assert study.load_state() == state
    assert '"tuner"' in (study.path / "study.json").read_text()
    torch.save({"evil": threading.Lock}, study.path / StudyDirectory.STATE_FILE)  # a class: needs unpickling
    with pytest.raises(CheckpointError, match="refused to load"):
        study.load_state()
    study.save_state(state)
    data = (study.path / StudyDirectory.STATE_FILE).read_bytes()
    (study.path / StudyDirectory.STATE_FILE).write_bytes(data[: len(data) // 2])  # torn (never by save_state)
    with pytest.raises(CheckpointError, match="unreadable"):
        study.load_state()


def test_sha256_file_and_checksum_refusal(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # several read chunks
    path = tmp_path / "epoch-1.ckpt"
    path.write_bytes(data)
    digest = sha256_file(path)
    assert digest == hashlib.sha256(data).hexdigest()
    study = StudyDirectory(tmp_path)
    study.verify_checkpoint(path, digest)
    study.verify_checkpoint(path, None)  # no recorded hash: only existence is checked
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="modified after the study wrote it"):
        study.verify_checkpoint(path, digest)
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        study.verify_checkpoint(path, digest)
    with pytest.raises(CheckpointError, match="not found"):
        sha256_file(path)
