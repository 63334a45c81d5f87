"""The live progress display of a study (rich): epochs spent, trials, best so far."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from lightning_fms.search.optimizer import FreezeThawOptimizer


class StudyProgress:
    """A one-line live display; on a non-terminal it prints a line every ``log_every`` epochs instead.

    Args:
        budget: Total epochs of the study.
        enabled: Show anything at all.
        log_every: Epochs between plain lines when the output is not a terminal.
    """

    def __init__(self, budget: int, enabled: bool = True, log_every: int = 10) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.log_every = log_every
        self._last_logged = -1
        self._progress = Progress(
            TextColumn("[bold]FMS"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epochs · {task.fields[trials]} trials · best {task.fields[best]}{task.fields[running]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not enabled or not self.console.is_terminal,
        )
        self._task = self._progress.add_task("study", total=budget, trials=0, best="-", running="")

    def __enter__(self) -> StudyProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, optimizer: FreezeThawOptimizer, best: str, running: str = "") -> None:
        """Show the optimizer's current numbers (``running``: what runs now, with several workers)."""
        spent = optimizer.epochs_spent
        self._progress.update(
            self._task,
            completed=optimizer.budget_spent,
            trials=len(optimizer.trials),
            best=best,
            running=f" · running {running}" if running else "",
        )
        if self.enabled and not self.console.is_terminal and spent != self._last_logged:
            if spent % self.log_every == 0 or optimizer.is_done:
                self.console.print(
                    f"FMS {optimizer.budget_spent:.4g}/{optimizer.budget} epochs · {len(optimizer.trials)} trials · "
                    f"best {best}" + (f" · running {running}" if running else ""),
                    highlight=False,
                )
                self._last_logged = spent
