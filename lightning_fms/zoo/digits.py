"""The demo task: scikit-learn's bundled 8x8 digits (no download), split into a source and a target task."""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_fms.extras import import_optional

TASK_DIGITS: dict[str, tuple[int, ...]] = {
    "source": (0, 1, 2, 3, 4),
    "target": (5, 6, 7, 8, 9),
    "all": tuple(range(10)),
}


def task_subset(images: Tensor, digits: Tensor, task: str, data_name: str) -> tuple[Tensor, Tensor]:
    """The images of one task's digits (:data:`TASK_DIGITS`), labelled ``0 .. k-1`` in digit order.

    Args:
        images: ``[N, ...]`` every image of a data set.
        digits: ``[N]`` (int64) the digit of each image.
        task: ``"source"``, ``"target"`` or ``"all"``.
        data_name: The data set's name, for the error message.

    Returns:
        ``(images [M, ...], labels [M])`` of the task's ``M`` images (a copy).

    Raises:
        ValueError: an unknown task.
    """
    if task not in TASK_DIGITS:
        raise ValueError(f"unknown {data_name} task {task!r}; choose one of {sorted(TASK_DIGITS)}")
    wanted = torch.tensor(TASK_DIGITS[task])
    keep = torch.isin(digits, wanted)
    return images[keep].clone(), torch.searchsorted(wanted, digits[keep])


def load_digits_task(task: str = "target") -> tuple[Tensor, Tensor]:
    """Load the images and labels of one digits task.

    Args:
        task: ``"source"`` (digits 0-4), ``"target"`` (digits 5-9, relabelled 0-4) or ``"all"`` (0-9).

    Returns:
        Images ``[N, 1, 8, 8]`` (float32 in ``[0, 1]``) and labels ``[N]`` (int64, ``0 .. num_classes - 1``).

    """
    if task not in TASK_DIGITS:
        raise ValueError(f"unknown digits task {task!r}; choose one of {sorted(TASK_DIGITS)}")
    datasets = import_optional("sklearn.datasets", "demo", "the digits data", package="scikit-learn")
    bunch = datasets.load_digits()
    digits = np.asarray(TASK_DIGITS[task])
    keep = np.isin(bunch.target, digits)
    images = torch.from_numpy(bunch.images[keep].astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(np.searchsorted(digits, bunch.target[keep]).astype(np.int64))
    return images, labels


def _stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split indices class by class; part ``i`` gets ``round(fractions[i] * n_class)``, the last part the rest."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for i, fraction in enumerate(fractions):
            count = int(round(fraction * len(idx)))
            parts[i].append(idx[start : start + count])
            start += count
        parts[-1].append(idx[start:])
    return [np.sort(np.concatenate(p)) for p in parts]


def _corrupt_labels(labels: Tensor, num_classes: int, fraction: float, seed: int) -> Tensor:
    """Return a copy of ``labels`` ``[N]`` with ``round(fraction * N)`` of them redrawn uniformly from the classes."""
    if fraction == 0.0:
        return labels
    rng = np.random.default_rng([seed, 0x1ABE1])
    picked = rng.permutation(len(labels))[: int(round(fraction * len(labels)))]
    noisy = labels.clone()
    noisy[torch.from_numpy(picked)] = torch.from_numpy(rng.integers(0, num_classes, len(picked)))
    return noisy


class DigitsDataModule(LightningDataModule):
    """Scikit-learn's 8x8 digits as a Lightning data module.

    Batches are ``(x, y)`` with ``x`` ``[B, 1, 8, 8]`` float32 in ``[0, 1]`` and ``y`` ``[B]`` int64. The
    train/val/test split is stratified by class and depends only on ``seed``.

    Args:
        task: ``"source"`` (digits 0-4), ``"target"`` (digits 5-9, relabelled 0-4) or ``"all"``.
        batch_size: Batch size of all loaders.
        val_fraction: Fraction of each class held out for validation.
        seed: Seed of the split.
        num_workers: DataLoader worker processes.
        test_fraction: Fraction of each class held out for testing (``0`` for no test split).
        label_noise: Fraction of the training labels replaced by labels drawn uniformly from all classes
            (seeded by ``seed``; a replaced label may by chance equal the true one). Validation and test
            labels stay clean. ``1.0`` gives random labels, as for pretraining a deliberately poor hub entry.

    """

    image_size = 8

    def __init__(
        self,
        task: str = "target",
        batch_size: int = 32,
        val_fraction: float = 0.25,
        seed: int = 0,
        num_workers: int = 0,
        test_fraction: float = 0.0,
        label_noise: float = 0.0,
    ):
        super().__init__()
        if task not in TASK_DIGITS:
            raise ValueError(f"unknown digits task {task!r}; choose one of {sorted(TASK_DIGITS)}")
        if not 0.0 < val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise ValueError("need 0 < val_fraction, 0 <= test_fraction and val_fraction + test_fraction < 1")
        if not 0.0 <= label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
        self.save_hyperparameters()
        self.task = task
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.label_noise = label_noise
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes of the task."""
        return len(TASK_DIGITS[self.task])

    def load_task(self) -> tuple[Tensor, Tensor]:
        """Return all images ``[N, 1, 8, 8]`` and labels ``[N]`` of the task; subclasses read other data here."""
        return load_digits_task(self.task)

    def setup(self, stage: str | None = None) -> None:
        """Load the data, split it and corrupt the training labels as asked (idempotent)."""
        if self.train_set is not None:
            return
        images, labels = self.load_task()
        val_idx, test_idx, train_idx = _stratified_split(
            labels.numpy(), (self.val_fraction, self.test_fraction), self.seed
        )
        train_labels = _corrupt_labels(labels[train_idx], self.num_classes, self.label_noise, self.seed)
        self.train_set = TensorDataset(images[train_idx], train_labels)
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorDataset(images[test_idx], labels[test_idx]) if len(test_idx) else None

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("no test split: construct DigitsDataModule with test_fraction > 0")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Return the shuffled training batches."""
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Return the validation batches, in a fixed order."""
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Return the test batches, in a fixed order (needs ``test_fraction > 0``)."""
        self.setup()
        return self._loader(self.test_set, shuffle=False)
