"""Seeds derived from names (no Lightning here; the trial seeder is :mod:`lightning_fms.training.seeder`).

All randomness in a study derives from the study seed and *where* it is used (decision index, trial
id, epoch), never from a stream that has to be carried along. A study killed and restarted therefore
draws exactly the numbers it would have drawn had it never stopped.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed that depends only on ``parts`` (stable across processes and Python versions)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything_quietly(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators without Lightning's log line."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
