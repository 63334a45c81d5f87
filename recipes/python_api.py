"""The Python API: an FMS study over a small model hub, in a script.

Which of six pretrained digit networks (MLP, CNN, ResNet; two widths each), with which learning rate,
momentum and batch size, fine-tunes best on digits 5-9?

Usage::

    python recipes/python_api.py --study_dir runs/api --budget 30
    python recipes/python_api.py --study_dir runs/api-wandb --budget 30 --wandb_project fms-digits  # W&B too
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_fms import FMSTuner, SearchSpace, load_best_weights
from lightning_fms.options import declared_default
from lightning_fms.search.searcher import SEARCHERS
from lightning_fms.testing import tiny_hub
from lightning_fms.zoo import DigitsDataModule, ImageClassifier, default_cache_dir


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="An FMS study over a tiny digits hub.")
    parser.add_argument("--study_dir", type=Path, default=Path("runs/python_api"))
    parser.add_argument("--budget", type=int, default=30, help="epochs over all trials")
    parser.add_argument("--max_epochs_per_trial", type=int, default=5)
    parser.add_argument("--searcher", default=declared_default("searcher"), choices=SEARCHERS)
    parser.add_argument("--hub_dir", type=Path, default=default_cache_dir() / "hubs" / "tiny")
    parser.add_argument("--wandb_project", default=None, help="also log to W&B (needs lightning_fms[wandb])")
    parser.add_argument("--wandb_mode", default=None, choices=("online", "offline", "disabled"))
    args = parser.parse_args(argv)

    hub = tiny_hub(args.hub_dir)  # pretrained on digits 0-4 the first time (seconds), then reused
    space = SearchSpace.from_dict(
        {
            "hub": {"type": "hub"},  # which pretrained entry to start from
            "model.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
            "model.momentum": {"type": "float", "low": 0.0, "high": 0.9},
            "data.batch_size": {"type": "categorical", "choices": [32, 64]},
        },
        hub_entries=hub.names,
    )
    observers = []
    if args.wandb_project:
        from lightning_fms.loggers import WandbStudyLogger

        observers.append(WandbStudyLogger(project=args.wandb_project, mode=args.wandb_mode))
    tuner = FMSTuner(
        ImageClassifier,  # receives the hub entry's pretrained module as `net` and the cap as `max_epochs`
        DigitsDataModule,
        space,
        hub=hub,
        study_dir=args.study_dir,
        budget=args.budget,
        monitor="val_acc",
        mode="max",
        max_epochs_per_trial=args.max_epochs_per_trial,
        searcher=args.searcher,
        datamodule_options={"task": "target"},
        trainer_options={"accelerator": "cpu", "devices": 1},
        progress=False,
        observers=observers,
    )
    result = tuner.run()  # rerun the same command after a crash: the study resumes
    weights = load_best_weights(args.study_dir)  # the best epoch's state_dict (read with weights_only=True)
    print(f"best {result.best_value} (trial {result.best_trial}, epoch {result.best_epoch}): {result.best_config}")
    print(f"{result.epochs_spent} epochs spent; best.ckpt holds {len(weights)} tensors; see {args.study_dir}")
    return {"result": result, "weights": weights}


if __name__ == "__main__":
    main()
