"""Rules 5, 6 and 8 restated from snapshots, independently of any implementation.

Data checks (gather vs the dense model) cannot see *which* block an allocation picks or *which*
cached block is evicted. These functions predict that from the snapshot taken before an operation.
"""

from __future__ import annotations

from pagedkv.spec.window import HOLE
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


class Replay:
    """Rules 5, 6 and the release rule replayed step by step from a snapshot, for operations that
    allocate and release in turn (extend and decode_step copy a tail, then release the old one)."""

    def __init__(self, before: Snapshot, block_size: int, pinned: set[int] = frozenset()) -> None:
        self.queue = list(before.free_queue)
        self.refcounts = list(before.refcounts)
        self.entries = {e.block: (e.namespace, e.path_tokens, e.last_used) for e in before.index}
        self.block_size = block_size
        self.now = before.clock + 1
        for block in pinned:
            self.refcounts[block] += 1

    def _is_leaf(self, block: int) -> bool:
        namespace, path, _ = self.entries[block]
        return not any(
            ns == namespace and len(p) == len(path) + self.block_size and p[: len(path)] == path
            for ns, p, _ in self.entries.values()
        )

    def allocate(self) -> int:
        if self.queue:
            block = self.queue.pop(0)
        else:
            leaves = [b for b in self.entries if self.refcounts[b] == 0 and self._is_leaf(b)]
            block = min(leaves, key=lambda b: (self.entries[b][2], b))
            del self.entries[block]
        self.refcounts[block] = 1
        return block

    def release(self, block: int) -> None:
        self.refcounts[block] -= 1
        if block in self.entries:
            namespace, path, _ = self.entries[block]
            self.entries[block] = (namespace, path, self.now)
        elif self.refcounts[block] == 0:
            self.queue.append(block)


def expected_allocation(
    before: Snapshot, count: int, pinned: set[int], block_size: int
) -> list[int]:
    """Rule 5: the free queue's head first, then rule-6 victims (no releases in between)."""
    replay = Replay(before, block_size, pinned)
    return [replay.allocate() for _ in range(count)]


def expected_extension(
    before: Snapshot, after: Snapshot, seqs: list[int], block_size: int
) -> tuple[list[int], list[int]]:
    """For extend/decode_step over `seqs` in order: (blocks the cache allocated, blocks the replay
    predicts). Per sequence: blocks the sliding window released (rule 10: now holes) first, then a
    tail block that changed was copied (allocate, then release the old), then new blocks."""
    replay, got, want = Replay(before, block_size), [], []
    for seq in seqs:
        old, new = table_of(before, seq), table_of(after, seq)
        for i, block in enumerate(old):
            if block != HOLE and new[i] == HOLE:
                replay.release(block)
        if old and new[len(old) - 1] not in (old[-1], HOLE):
            got.append(new[len(old) - 1])
            want.append(replay.allocate())
            replay.release(old[-1])
        for block in new[len(old) :]:
            got.append(block)
            want.append(replay.allocate())
    return got, want


def table_of(snapshot: Snapshot, seq: int) -> tuple[int, ...]:
    return next(s.table for s in snapshot.sequences if s.id == seq)


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


def tail_was_shared(before: Snapshot, after: Snapshot, seq: int, batch: list[int]) -> bool:
    """Rule 1 at `seq`'s turn in a decode_step: was its tail shared or indexed then? Earlier
    sequences of the batch that copied away from the same block, or whose window released it,
    no longer hold it."""
    tail = table_of(before, seq)[-1]
    earlier = batch[: batch.index(seq)]
    left = sum(
        1
        for s in earlier
        for i, block in enumerate(table_of(before, s))
        if block == tail and table_of(after, s)[i] != tail
    )
    indexed = {e.block for e in before.index}
    return before.refcounts[tail] - left != 1 or tail in indexed
