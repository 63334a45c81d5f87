"""The 45 decisions of a seed-0 study on the tiny hub (budget 30), pinned: a restructuring must not change one of them.

The study uses the deep-kernel searcher with the statistics featurizer and the frozen-layer fidelity, so the
pin covers candidates, fractions and costs, weight snapshots, the surrogate fit and the checkpoint resume path.
Re-pin (only for an intended change of behaviour) with ``LIGHTNING_FMS_REPIN=1 pytest tests/test_pinned_decisions.py``.
"""

import json
import os
from pathlib import Path

import pytest

from lightning_fms import FMSTuner, SearchSpace
from lightning_fms.zoo import DigitsDataModule, ImageClassifier

PIN = Path(__file__).parent / "data" / "pinned_decisions.json"
SPACE = {
    "hub": {"type": "hub"},
    "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
    "model.momentum": {"type": "float", "low": 0.0, "high": 0.9},
    "data.batch_size": {"type": "categorical", "choices": [32, 64]},
}


def run_study(hub, study_dir: Path) -> list[dict]:
    space = SearchSpace.from_dict(SPACE, hub_entries=hub.names)
    tuner = FMSTuner(
        ImageClassifier,
        DigitsDataModule,
        space,
        hub=hub,
        study_dir=study_dir,
        budget=30,
        monitor="val_acc",
        max_epochs_per_trial=4,
        seed=0,
        searcher="dyhpo",
        weights="stats",
        frozen_layers=True,
        num_fresh_candidates=16,
        surrogate_options={"full_fit_steps": 60, "refine_steps": 10, "full_fits": 2},
        datamodule_options={"task": "target"},
        trainer_options={"accelerator": "cpu"},
        progress=False,
    )
    tuner.run()
    return [
        {
            "trial": d["trial"],
            "epoch": d["epoch"],
            "kind": d["kind"],
            "fraction": d.get("trainable_fraction", 1.0),
            "budget_spent": round(d["budget_spent"], 9),
            "value": d["value"],
        }
        for d in tuner.optimizer.decisions
    ]


@pytest.mark.slow
def test_first_30_decisions_are_pinned(hub, tmp_path):
    decisions = run_study(hub, tmp_path / "study")
    if os.environ.get("LIGHTNING_FMS_REPIN"):
        PIN.write_text(json.dumps(decisions, indent=1) + "\n")
    pinned = json.loads(PIN.read_text())
    for i, (got, want) in enumerate(zip(decisions, pinned)):
        assert got == want, f"decision {i} differs: {got} != {want}"
    assert len(decisions) == len(pinned) >= 30
