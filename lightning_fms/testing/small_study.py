"""The small study the driver and Ray study tests run: two hub entries, one learning rate, cap 3."""

from __future__ import annotations

from lightning_fms.search.space import SearchSpace
from lightning_fms.tuner import FMSTuner

SPACE = {"hub": {"type": "hub"}, "model.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}}
ENTRIES = ["mlp-xs", "mlp-s"]


def study_space() -> SearchSpace:
    """The small study's space: a hub choice of two entries and a learning rate."""
    return SearchSpace.from_dict(SPACE, hub_entries=ENTRIES)


def tuner_for(hub, study_dir, executor, fast_surrogate, budget=8, **options) -> FMSTuner:
    """The tuner of a small study run by ``executor`` (``options``: more FMSTuner arguments)."""
    return FMSTuner(
        executor=executor,
        space=study_space(),
        hub=hub,
        study_dir=study_dir,
        budget=budget,
        monitor="val_acc",
        max_epochs_per_trial=3,
        num_fresh_candidates=8,
        num_startup_trials=2,
        surrogate_options=fast_surrogate,
        progress=False,
        **options,
    )


def decisions(tuner) -> list[tuple]:
    """(decision, trial, epoch, value) of every committed epoch, in order."""
    return [(d["decision"], d["trial"], d["epoch"], d["value"]) for d in tuner.optimizer.decisions]
