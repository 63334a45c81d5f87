"""The decision log in state.pt: JSON blocks, the unchanged ones reused, old states still readable."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fms.errors import CheckpointError
from lightning_fms.study.decision_blocks import BLOCK_SIZE, BLOCKS_KEY, DecisionBlocks, decode_decisions
from lightning_fms.study.directory import StudyDirectory


def _decisions(n: int) -> list[dict]:
    return [
        {
            "decision": i,
            "kind": "start" if i % 3 else "resume",
            "trial": i // 2,
            "epoch": 1 + i % 4,
            "value": 0.5 + i / 1e4,
        }
        for i in range(n)
    ]


def test_a_log_round_trips_through_blocks_exactly():
    log = _decisions(2 * BLOCK_SIZE + 7)
    log[3]["value"] = math.inf
    log[5]["worker"] = "w1"
    blocks = DecisionBlocks().encode(log)
    assert len(blocks) == 3 and all(isinstance(b, str) for b in blocks)
    assert decode_decisions(blocks) == log


def test_complete_blocks_are_serialised_once_and_again_when_they_change():
    encoder = DecisionBlocks()
    log = _decisions(BLOCK_SIZE + 1)
    first = encoder.encode(log)
    log.append({"decision": BLOCK_SIZE + 1, "kind": "start", "trial": 9, "epoch": 1, "value": 0.1})
    second = encoder.encode(log)
    assert second[0] is first[0]  # the full block's text is reused
    assert second[1] != first[1]
    log[0]["value"] = 0.0  # a rewritten history (another study's state) is serialised again
    third = encoder.encode(log)
    assert third[0] is not first[0] and decode_decisions(third) == log


def test_the_study_directory_stores_blocks_and_loads_both_formats(tmp_path):
    study = StudyDirectory(tmp_path / "s")
    log = _decisions(BLOCK_SIZE + 3)
    study.save_state({"version": 1, "epochs_spent": len(log), "decisions": log}, readable=False)
    raw = torch.load(study.path / "state.pt", weights_only=True)
    assert "decisions" not in raw and len(raw[BLOCKS_KEY]) == 2
    assert StudyDirectory(study.path).load_state()["decisions"] == log
    torch.save({"version": 1, "epochs_spent": 2, "decisions": log[:2]}, study.path / "state.pt")  # the old format
    assert StudyDirectory(study.path).load_state()["decisions"] == log[:2]


def test_a_corrupted_block_is_refused_in_one_line(tmp_path):
    study = StudyDirectory(tmp_path)
    torch.save({"version": 1, BLOCKS_KEY: ['[{"decision": 0,']}, study.path / "state.pt")
    with pytest.raises(CheckpointError, match="unreadable"):
        study.load_state()
