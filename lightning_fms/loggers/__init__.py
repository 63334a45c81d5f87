"""Study loggers: observers that send a study to an experiment tracker.

:class:`~lightning_fms.loggers.wandb.WandbStudyLogger` needs the ``wandb`` extra
(``pip install 'lightning_fms[wandb]'``); it imports ``wandb`` only when it is constructed.
"""

from lightning_fms.loggers.wandb import WandbStudyLogger, wandb_available

__all__ = ["WandbStudyLogger", "wandb_available"]
