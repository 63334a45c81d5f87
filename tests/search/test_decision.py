"""Typed decisions: the fraction and the cost travel from the choice to the record; claim/complete fake nothing."""

import io
import math

import pytest
import torch

from lightning_fms.frozen.levels import FrozenLayers
from lightning_fms.search.decision import ClaimedEpoch, Decision, SuggestionKind
from lightning_fms.search.optimizer import FreezeThawOptimizer
from lightning_fms.search.searcher import build_searcher
from lightning_fms.search.space import SearchSpace

SPACE = SearchSpace.from_dict(
    {
        "model.lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
        "data.batch_size": {"type": "categorical", "choices": [16, 32]},
    }
)


def optimizer(budget=6, cap=3, **kw):
    return FreezeThawOptimizer(
        SPACE, build_searcher("random", SPACE, cap), budget=budget, max_epochs_per_trial=cap, **kw
    )


def value(s):
    return 1.0 - math.exp(-s.epoch * s.config["model.lr"])


def test_a_decision_survives_its_running_record():
    decision = Decision(
        index=7,
        trial_id=3,
        kind=SuggestionKind.RESUME,
        epoch=2,
        candidates=12,
        fraction=0.5,
        cost=0.375,
        frozen_layers=True,
        diagnostics=(("acquisition", 0.25), ("surrogate_s", 1.5)),
    )
    record = ClaimedEpoch(decision, {"pid": 4}).to_record()
    assert record == {
        "kind": "resume",
        "epoch": 2,
        "decision": 7,
        "info": {"candidates": 12, "acquisition": 0.25, "surrogate_s": 1.5, "trainable_fraction": 0.5, "cost": 0.375},
        "owner": {"pid": 4},
    }
    assert ClaimedEpoch.from_record(3, record) == ClaimedEpoch(decision, {"pid": 4})
    entry = decision.log_entry(0.5, epochs_spent=4, budget_spent=2.5, wall_s=3)
    assert list(entry) == ["decision", "kind", "trial", "epoch", "value", "epochs_spent", "budget_spent", "wall_s",
                           "candidates", "acquisition", "surrogate_s", "trainable_fraction", "cost"]  # fmt: skip
    plain = Decision(index=0, trial_id=0, kind=SuggestionKind.START, epoch=1, candidates=4)
    assert "trainable_fraction" not in plain.log_entry(0.1, 1, 1.0, 0.0) and plain.cost == 1.0


def test_a_state_in_the_format_written_before_decisions_were_typed_still_loads():
    """A state built by hand, field by field as FreezeThawOptimizer.state_dict wrote it (with a running epoch)."""
    config_a, config_b = {"model.lr": 0.1, "data.batch_size": 16}, {"model.lr": 0.5, "data.batch_size": 32}
    state = {
        "version": 1,
        "settings": {"space": SPACE.to_dict(), "cap": 3, "mode": "max", "seed": 0},
        "trials": [
            {"id": 0, "config": config_a, "values": [0.25], "status": "paused", "error": None, "wall_s": [1.0]},
            {"id": 1, "config": config_b, "values": [], "status": "running", "error": None, "wall_s": []},
        ],
        "decisions": [
            {
                "decision": 0,
                "kind": "start",
                "trial": 0,
                "epoch": 1,
                "value": 0.25,
                "epochs_spent": 1,
                "budget_spent": 1.0,
                "wall_s": 1.0,
                "candidates": 64,
                "surrogate_s": 0.0,
            },
        ],  # fmt: skip
        "epochs_spent": 1,
        "budget_spent": 1.0,
        "stopped_by_limit": [],
        "searcher": {},
        "running": {
            "1": {
                "kind": "start",
                "epoch": 1,
                "decision": 1,
                "info": {"candidates": 65, "surrogate_s": 0.0},
                "owner": {"host": "h", "pid": 12, "started": 0.0},
            },
        },  # fmt: skip
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    opt = optimizer()
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    claimed = opt.running[1]
    assert claimed.decision == Decision(
        index=1, trial_id=1, kind=SuggestionKind.START, epoch=1, candidates=65, diagnostics=(("surrogate_s", 0.0),)
    )
    assert claimed.owner["pid"] == 12
    assert opt.state_dict()["running"] == state["running"]  # written back unchanged
    assert opt.complete(1, 1, 0.5, wall_s=2.0) == []
    assert opt.decisions[-1] == {"decision": 1, "kind": "start", "trial": 1, "epoch": 1, "value": 0.5,
                                 "epochs_spent": 2, "budget_spent": 2.0, "wall_s": 2.0, "candidates": 65,
                                 "surrogate_s": 0.0}  # fmt: skip
    assert opt.trials[1].values == [0.5] and "running" not in opt.state_dict()


def test_claim_and_complete_make_the_decisions_ask_and_tell_make():
    asked, claimed = optimizer(budget=8), optimizer(budget=8)
    while (s := asked.ask()) is not None:
        asked.tell(s.trial_id, s.epoch, value(s), wall_s=0.5)
        c = claimed.claim({"pid": 1})
        assert c == s
        claimed.complete(c.trial_id, c.epoch, value(c), wall_s=0.5)
    assert claimed.claim({"pid": 1}) is None
    assert claimed.decisions == asked.decisions and claimed.state_dict() == asked.state_dict()


def test_complete_leaves_a_pending_ask_alone():
    opt = optimizer()
    running = opt.claim({"pid": 1})
    asked = opt.ask()  # another suggestion, asked while the claimed epoch runs
    assert opt.pending == asked and asked.trial_id != running.trial_id
    opt.complete(running.trial_id, running.epoch, 0.5)
    assert opt.pending == asked  # completing did not replace or clear it
    opt.tell(asked.trial_id, asked.epoch, 0.25)
    assert opt.pending is None
    assert [(d["trial"], d["value"]) for d in opt.decisions] == [(running.trial_id, 0.5), (asked.trial_id, 0.25)]
    with pytest.raises(RuntimeError, match="is not running"):
        opt.complete(running.trial_id, running.epoch, 0.5)


def test_the_budget_is_charged_the_chosen_fractions_cost():
    frozen = FrozenLayers((0.5, 1.0), {"": (0.3, 1.0)})
    opt = optimizer(budget=4, frozen_layers=frozen)
    charged = []
    while (s := opt.ask()) is not None:
        charged.append(frozen.cost("", s.fraction))
        opt.tell(s.trial_id, s.epoch, value(s))
    assert opt.budget_spent == pytest.approx(sum(charged)) and opt.budget_spent <= 4 + 1e-9
    assert [d["cost"] for d in opt.decisions] == charged
    assert [d["budget_spent"] for d in opt.decisions] == pytest.approx(list(_cumulative(charged)))
    assert all(d["trainable_fraction"] in (0.5, 1.0) for d in opt.decisions)
    assert 0.5 in [d["trainable_fraction"] for d in opt.decisions]  # a cheaper epoch was bought
    failing = optimizer(budget=2, frozen_layers=frozen)
    s = failing.ask()
    failing.tell_failure(s.trial_id, s.epoch, "boom")  # a failed epoch is charged its cost too
    assert failing.budget_spent == frozen.cost("", s.fraction) and failing.trials[s.trial_id].fractions == [s.fraction]


def _cumulative(values):
    total = 0.0
    for v in values:
        total += v
        yield total
