"""A LightningCLI training script; the only change for FMS is the import.

Train once::

    python train.py fit --config cfg.yaml --model.pretrained weights/cnn-s.safetensors

Search hub entry and hyperparameters (100 epochs in total)::

    python train.py fit --config cfg.yaml --tuner fms --tuner.space space.yaml --tuner.budget 100 \\
        --tuner.study_dir runs/s1

The same with a W&B sweep file as the search space, logged to W&B (offline here)::

    python train.py fit --config cfg.yaml --tuner fms --tuner.space sweep.yaml --tuner.hub_key model.pretrained \\
        --tuner.budget 100 --tuner.study_dir runs/s2 --tuner.wandb.project fms-digits --tuner.wandb.mode offline
"""

from digits import DigitsFineTuner

from lightning_fms import FMSLightningCLI as LightningCLI  # was: from lightning.pytorch.cli import LightningCLI
from lightning_fms.zoo import DigitsDataModule


def main(args: list[str] | None = None) -> None:
    LightningCLI(DigitsFineTuner, DigitsDataModule, args=args)


if __name__ == "__main__":
    main()
