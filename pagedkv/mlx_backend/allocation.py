"""How blocks move, on the backend (mirrors `pagedkv.spec.allocation`, which explains each step):
the mechanics the metadata operations of `PagedCache` share once their checks have passed, and
the plans of how many blocks `extend` / `decode_step` need. Same method names as the spec's;
written for the backend's structures (an O(1) free queue, the index's LRU heap and blocked counts,
int32 tables with a count of leading holes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedkv.config import ceil_div
from pagedkv.mlx_backend.window import HOLE, blocks_before_window

if TYPE_CHECKING:
    from pagedkv.mlx_backend.sequence import Sequence


class Allocation:
    """Mixed into `PagedCache`: expects `config`, `size`, `pool`, `index`, `storage`, `counters`
    and `_is_writable`. Every method here runs after the calling operation's checks."""

    def _allocate(self) -> int:
        """Rule 5, else rule 6: the free queue's head, else the LRU cached leaf (popped from the
        heap). Precondition: `_require_blocks` passed. Returns the block at refcount 1."""
        refcounts = self.pool.refcounts
        if self.pool.free_queue:
            block = self.pool.free_queue.popleft()
        else:
            block = self.index.pop_lru_leaf().block
            self.counters.evictions += 1
        refcounts[block] = 1
        return block

    def _release(self, block: int, now: int) -> None:
        """D4: one reference dropped; an indexed block is touched (and becomes evictable at
        refcount 0), an unindexed one at refcount 0 joins the free queue's tail."""
        refcounts = self.pool.refcounts
        refcounts[block] -= 1
        node = self.index.by_block.get(block)
        if node is not None:
            node.last_used = now
            if refcounts[block] == 0:
                self.index.released(node)
        elif refcounts[block] == 0:
            self.pool.free_queue.append(block)

    def _window_releases(self, seq: Sequence) -> list[int]:
        """Rule 10: the held blocks wholly before the window of the next query (at len)."""
        dead = blocks_before_window(len(seq.tokens), self.config.window, self.size)
        return seq.table[seq.holes : max(dead, seq.holes)].tolist()

    def _release_before_window(self, seq: Sequence, now: int) -> None:
        """Rule 10: releases those blocks, front to back, leaving holes in the table."""
        dead = blocks_before_window(len(seq.tokens), self.config.window, self.size)
        while seq.holes < dead:
            self._release(seq.table.item(seq.holes), now)
            seq.table[seq.holes] = HOLE
            seq.holes += 1

    def _extend_plan(self, seq: Sequence, new_tokens: int) -> tuple[bool, int]:
        """(does the tail need copy-on-write, how many blocks past the tail) for new_tokens."""
        length = len(seq.tokens)
        cow = length % self.size != 0 and not self._is_writable(int(seq.table[seq.num_blocks - 1]))
        return cow, ceil_div(length + new_tokens, self.size) - seq.num_blocks

    def _decode_plans(self, seqs: list[Sequence]) -> list[tuple[bool, int]]:
        """(copy the tail, blocks past it) per sequence of a decode step, in batch order: copying
        one sequence's shared tail, or releasing blocks before its window, drops references, which
        can leave a later sequence's tail exclusive (no copy)."""
        size, refcounts, indexed = self.size, self.pool.refcounts, self.index.by_block
        plans, dropped, window = [], None, self.config.window
        for seq in seqs:  # inline _extend_plan: this loop is the per-token hot path of a server
            if window is not None:  # blocks this step's window releases drop references too
                for block in self._window_releases(seq):
                    dropped = dropped if dropped is not None else {}
                    dropped[block] = dropped.get(block, 0) + 1
            if len(seq.tokens) % size:
                tail = seq.table.item(seq.num_blocks - 1)
                cow = refcounts[tail] != 1 or tail in indexed
                if cow:  # a copy earlier in this batch may have left this tail exclusive
                    dropped = dropped if dropped is not None else {}
                    cow = refcounts[tail] - dropped.get(tail, 0) != 1 or tail in indexed
                    if cow:
                        dropped[tail] = dropped.get(tail, 0) + 1
                plans.append((cow, 0))
            else:
                plans.append((False, 1))  # a fresh block past the full tail
        return plans

    def _copy_on_write_tail(self, seq: Sequence, now: int) -> None:
        """Rule 1, D3: a fresh block gets the tail's visible rows in every layer and replaces it;
        the old block is released (D4)."""
        old = int(seq.table[seq.num_blocks - 1])
        new = self._allocate()
        if self.storage is not None:
            self.storage.copy_rows(old, new, len(seq.tokens) % self.size)
        seq.table[seq.num_blocks - 1] = new
        self._release(old, now)
        self.counters.cow_copies += 1
