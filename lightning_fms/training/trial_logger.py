"""A CSV logger whose ``metrics.csv`` survives the many short fits of one trial.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when a new writer opens its directory, so a
trial resumed in a fresh Trainer would keep only its last epoch. :class:`TrialCSVLogger` appends instead:
one file per trial holds every epoch it trained.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from typing_extensions import override


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` and continues it with the same columns."""

    @override
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                header = next(csv.reader(handle), [])
            self.metrics_keys = sorted(set(header))


class TrialCSVLogger(CSVLogger):
    """``CSVLogger`` for one trial across its resumed fits (same arguments as ``CSVLogger``)."""

    @property
    @override
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
