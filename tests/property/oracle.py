"""Rules 5, 6 and 8 restated from snapshots, independently of any implementation.

Data checks (gather vs the dense model) cannot see *which* block an allocation picks or *which*
cached block is evicted. These functions predict that from the snapshot taken before an operation.
"""

from __future__ import annotations

from pagedkv.types import IndexEntry, Snapshot


def lru_victims(before: Snapshot, count: int, pinned: set[int], block_size: int) -> list[int]:
    """Rule 6: repeatedly evict the cached leaf with the smallest (last_used, block id)."""
    entries: list[IndexEntry] = list(before.index)

    def has_child(entry: IndexEntry) -> bool:
        depth = len(entry.path_tokens)
        return any(
            other.namespace == entry.namespace
            and len(other.path_tokens) == depth + block_size
            and other.path_tokens[:depth] == entry.path_tokens
            for other in entries
        )

    victims: list[int] = []
    while len(victims) < count:
        leaves = [
            e
            for e in entries
            if before.refcounts[e.block] == 0 and e.block not in pinned and not has_child(e)
        ]
        if not leaves:
            break
        victim = min(leaves, key=lambda e: (e.last_used, e.block))
        entries.remove(victim)
        victims.append(victim.block)
    return victims


def expected_allocation(
    before: Snapshot, count: int, pinned: set[int], block_size: int
) -> list[int]:
    """Rule 5: the free queue's head first, then rule-6 victims."""
    from_queue = list(before.free_queue[:count])
    return from_queue + lru_victims(before, count - len(from_queue), pinned, block_size)


def table_of(snapshot: Snapshot, seq: int) -> tuple[int, ...]:
    return next(s[3] for s in snapshot.sequences if s[0] == seq)


def check_release(before: Snapshot, after: Snapshot, released_tail_first: list[int]) -> None:
    """Rule 8 / free: released blocks that become free join the queue's tail in release order;
    released indexed blocks are touched (last_used = the operation's tick)."""
    indexed = {e.block for e in before.index}
    refcounts = list(before.refcounts)
    joined = []
    for block in released_tail_first:
        refcounts[block] -= 1
        if refcounts[block] == 0 and block not in indexed:
            joined.append(block)
    assert after.free_queue == before.free_queue + tuple(joined), "release order (rule 8)"
    touched = {e.block: e.last_used for e in after.index}
    for block in released_tail_first:
        if block in indexed:
            assert touched.get(block) == after.clock, f"released cached block {block} not touched"
