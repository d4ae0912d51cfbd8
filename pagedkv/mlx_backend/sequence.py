"""A sequence's state on the backend, and the event counters `stats()` reports (mirrors
`pagedkv.spec.sequence`). The table is an int32 buffer with spare capacity, so appending a block
never copies the table; the leading holes the window left are counted, and the index nodes of the
committed blocks are remembered so that a commit resumes where the last one stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pagedkv.mlx_backend.index import Node


class Sequence:
    __slots__ = (
        "id",
        "namespace",
        "tokens",
        "table",
        "num_blocks",
        "committed",
        "path",
        "epoch",
        "holes",
    )

    def __init__(
        self,
        seq_id: int,
        namespace: str,
        tokens: list[int],
        table: np.ndarray,
        num_blocks: int,
        committed: int,
        path: list[Node],
        epoch: int,
        holes: int = 0,
    ) -> None:
        self.id = seq_id
        self.namespace = namespace
        self.tokens = tokens
        self.table = table  # int32 buffer with spare capacity; the live part is [:num_blocks]
        self.num_blocks = num_blocks
        self.committed = committed
        self.path = path  # index nodes of the committed blocks, valid while epoch matches
        self.epoch = epoch
        self.holes = holes  # leading table entries released by the window (-1), rule 10

    def append_block(self, block: int) -> None:
        if self.num_blocks == len(self.table):
            grown = np.empty(max(8, 2 * len(self.table)), np.int32)
            grown[: self.num_blocks] = self.table[: self.num_blocks]
            self.table = grown
        self.table[self.num_blocks] = block
        self.num_blocks += 1

    def blocks(self) -> list[int]:
        return self.table[: self.num_blocks].tolist()

    def held(self) -> list[int]:
        """The table without its holes."""
        return self.table[self.holes : self.num_blocks].tolist()


@dataclass(slots=True)
class Counters:
    """The event counters of `pagedkv.types.Stats` (slots: they change on every operation)."""

    prefix_queries: int = 0
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefill_tokens_avoided: int = 0
    cow_copies: int = 0
    evictions: int = 0
    duplicates: int = 0
