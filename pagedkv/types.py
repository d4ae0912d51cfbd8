"""Plain data returned by both implementations, so results compare with `==`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stats:
    """Counters and block states. The first group is derived from the state; the second counts events."""

    free_blocks: int  # refcount 0, not in the prefix index
    cached_blocks: int  # refcount 0, in the prefix index (evictable once they are leaves)
    in_use_blocks: int  # refcount >= 1
    shared_blocks: int  # refcount >= 2
    indexed_blocks: int  # in the prefix index, whatever their refcount
    sequences: int  # live sequences
    tokens_stored: int  # sum of live sequence lengths (what dense per-sequence caches would hold)
    unique_tokens: int  # K/V rows actually held: per in-use block, the most rows any holder sees
    prefix_queries: int  # add_sequence calls
    prompt_tokens: int  # prompt tokens seen by add_sequence
    prefix_hit_tokens: int  # of those, served from the prefix index
    prefill_tokens_avoided: int  # hit tokens plus tokens inherited by fork
    cow_copies: int  # blocks copied by copy-on-write
    evictions: int  # cached blocks evicted (by pressure, evict() or clear_cache())
    duplicates: int  # committed blocks that found an equal block already indexed (rule 4)


@dataclass(frozen=True)
class IndexEntry:
    """One node of the prefix index: the tokens of its whole path, the block it points at."""

    namespace: str
    path_tokens: tuple[int, ...]
    block: int
    last_used: int


@dataclass(frozen=True)
class SequenceEntry:
    """One live sequence: its handle, tokens and block table (-1 for a block the sliding window
    released), and how many of its leading full blocks were committed."""

    id: int
    namespace: str
    tokens: tuple[int, ...]
    table: tuple[int, ...]
    committed: int


@dataclass(frozen=True)
class Snapshot:
    """Everything observable about the cache's metadata, for comparing two caches exactly."""

    clock: int
    next_sequence_id: int
    free_queue: tuple[int, ...]
    refcounts: tuple[int, ...]
    sequences: tuple[SequenceEntry, ...]  # sorted by id
    index: tuple[IndexEntry, ...]  # sorted by (namespace, path_tokens)
    stats: Stats
