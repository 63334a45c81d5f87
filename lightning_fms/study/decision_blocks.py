"""The decision log in ``state.pt``: blocks of JSON text, each serialised once.

The state is saved after every commit (several a second with many workers), and the decision log is its
largest part and grows with the study: ``torch.save`` visits every dict and number of it on every save (a
Python callback per object), about 5 ms per 1,000 decisions on the project's CPU. The log only ever grows, so
it is stored as blocks of :data:`BLOCK_SIZE` decisions, each a JSON array; a :class:`DecisionBlocks` encoder
keeps the text of the complete blocks it wrote and serialises only the last, partial block again (a complete
block is reused only when its decisions compare equal to the ones it was written from).

A state written before this format (``"decisions"``: a list of dicts) still loads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

__all__ = ["BLOCK_SIZE", "DECISIONS_KEY", "BLOCKS_KEY", "DecisionBlocks", "decode_decisions"]

#: Decisions per block.
BLOCK_SIZE = 256
#: The key of the decision log in the optimizer's state (a list of dicts).
DECISIONS_KEY = "decisions"
#: The key of the encoded log in ``state.pt`` (a list of JSON strings, or of lists where JSON could not hold one).
BLOCKS_KEY = "decision_blocks"


class DecisionBlocks:
    """Encodes a growing decision log, reusing the text of the blocks that did not change."""

    def __init__(self) -> None:
        self._complete: dict[int, tuple[list[dict[str, Any]], str]] = {}  # block index -> (its decisions, JSON)

    def encode(self, decisions: Sequence[dict[str, Any]]) -> list[str | list[dict[str, Any]]]:
        """The blocks of ``decisions``: a JSON array each (a plain list where a value is not JSON)."""
        blocks: list[str | list[dict[str, Any]]] = []
        for block_index, start in enumerate(range(0, len(decisions), BLOCK_SIZE)):
            block = list(decisions[start : start + BLOCK_SIZE])
            cached = self._complete.get(block_index)
            if cached is not None and cached[0] == block:
                blocks.append(cached[1])
                continue
            try:
                text = json.dumps(block)
            except (TypeError, ValueError):
                blocks.append(block)
                continue
            if len(block) == BLOCK_SIZE:  # kept as copies: the caller's dicts may change later
                self._complete[block_index] = ([dict(d) for d in block], text)
            blocks.append(text)
        return blocks


def decode_decisions(blocks: Sequence[str | Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The decision log from :meth:`DecisionBlocks.encode`'s blocks."""
    decisions: list[dict[str, Any]] = []
    for block in blocks:
        decisions.extend(json.loads(block) if isinstance(block, str) else [dict(d) for d in block])
    return decisions
