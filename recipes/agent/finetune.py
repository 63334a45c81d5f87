"""An ordinary fine-tuning script, driven by `lightning-fms agent`.

Its only FMS-specific line is `FMSCheckpointCallback()` in the Trainer. The agent appends the suggested
values as `--model.lr=... --data.batch_size=...` and, for a paused trial, `--ckpt_path=...`:

    lightning-fms agent --study_dir runs/agent --space recipes/agent/space.yaml --budget 20 \
        --monitor val_acc --mode max --max_epochs_per_trial 5 -- python recipes/agent/finetune.py
"""

import argparse

import torch
from lightning.pytorch import Trainer

from lightning_fms import FMSCheckpointCallback
from lightning_fms.zoo import MLP, DigitsDataModule, ImageClassifier

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model.lr", dest="lr", type=float, default=0.05)
parser.add_argument("--data.batch_size", dest="batch_size", type=int, default=32)
parser.add_argument("--ckpt_path", default=None)
parser.add_argument("--max_epochs", type=int, default=5, help="at least the study's per-trial cap")
args = parser.parse_args()

torch.manual_seed(0)
module = ImageClassifier(net=MLP(num_classes=5, hidden=16), lr=args.lr, max_epochs=args.max_epochs)
data = DigitsDataModule(task="target", batch_size=args.batch_size)
trainer = Trainer(
    max_epochs=args.max_epochs,
    callbacks=[FMSCheckpointCallback()],
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    accelerator="cpu",
    devices=1,
)
trainer.fit(module, datamodule=data, ckpt_path=args.ckpt_path, weights_only=True)
