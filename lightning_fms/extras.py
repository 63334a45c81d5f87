"""Optional dependencies: import one where it is used, or say in one line which extra installs it.

The core (search, surrogates, the GMN/FLAT/statistics featurizers, training, studies) needs none of them:

| extra | package | needed by |
|---|---|---|
| ``plots`` | matplotlib | ``regret.png`` (skipped with a warning when missing) and the benchmark's figures |
| ``nfn`` | nfn | the ``nfn`` featurizer (:mod:`lightning_fms.weights.nfn`) |
| ``demo`` | scikit-learn | the digits data of the demo and the benchmark (:mod:`lightning_fms.zoo.digits`) |
| ``wandb`` | wandb | W&B logging (:mod:`lightning_fms.loggers`) |
| ``ray`` | ray | the Ray executor (:mod:`lightning_fms.parallel.ray_executor`) |
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lightning_fms.errors import FMSError


def install_hint(extra: str) -> str:
    """The command that installs an extra, e.g. ``pip install 'lightning_fms[plots]'``."""
    return f"pip install 'lightning_fms[{extra}]'"


def import_optional(module: str, extra: str, what: str, package: str | None = None) -> ModuleType:
    """Import an optional dependency.

    Args:
        module: The module to import, e.g. ``"matplotlib.pyplot"``.
        extra: The extra of ``lightning_fms`` that installs it, e.g. ``"plots"``.
        what: What needs it, for the message (``"regret.png"``).
        package: The package's name where it differs from the module's (``"scikit-learn"`` for ``sklearn``).

    Returns:
        The imported module.

    Raises:
        FMSError: it is not installed (the message names the extra to install).
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = package or module.partition(".")[0]
        raise FMSError(f"{what} needs the {package} package: {install_hint(extra)}") from None
