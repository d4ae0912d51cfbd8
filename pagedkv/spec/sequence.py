"""A sequence's state, and the event counters `stats()` reports.

A *sequence* is what a handle names: its tokens, its block table, and how many of its leading full
blocks it has committed. Position p lives in block `table[p // block_size]`, row `p % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sequence:
    """A handle's state: its tokens and the block holding each run of `block_size` positions."""

    id: int
    namespace: str
    tokens: list[int]
    table: list[int]  # position p lives in block table[p // block_size], row p % block_size;
    # HOLE (-1) for a block released by the window (rule 10)
    committed: int  # leading full blocks already committed (for counting duplicates once)


@dataclass
class Counters:
    """The event counters of `pagedkv.types.Stats` (the derived block states are recounted)."""

    prefix_queries: int = 0
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefill_tokens_avoided: int = 0
    cow_copies: int = 0
    evictions: int = 0
    duplicates: int = 0
