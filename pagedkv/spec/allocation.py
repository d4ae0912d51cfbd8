"""How blocks move: the mechanics that `PagedCache`'s metadata operations share.

`PagedCache` (`cache.py`) says what each operation does and checks it first (rule 7); the methods
here move the blocks once the checks have passed, and plan how many an operation will need:

- `_allocate`: the free queue's head (rule 5), else the least recently used cached leaf (rule 6).
- `_release`: one reference dropped; where the block goes then (D4).
- `_window_releases`, `_release_before_window`: what a sliding window lets go (rule 10, D10).
- `_copy_on_write_tail`: a shared or indexed tail copied before it is written (rule 1, D3).
- `_extend_plan`, `_decode_plans`: how many fresh blocks `extend` / `decode_step` need (D2, D3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedkv.spec.pool import blocks_for
from pagedkv.spec.window import HOLE, blocks_before_window

if TYPE_CHECKING:
    from pagedkv.spec.sequence import Sequence


class Allocation:
    """Mixed into `PagedCache`: expects `config`, `pool`, `index`, `storage`, `counters` and
    `_is_writable`. Every method here runs after the calling operation's checks."""

    def _allocate(self) -> int:
        """Rule 5: pop the free queue's head; when it is empty, evict (rule 6) and use that block.
        Precondition: a block is available (checked by _require_blocks). Returns it at refcount 1."""
        if self.pool.num_free():
            block = self.pool.pop_free()
        else:
            victim = self.index.lru_leaf(self.pool.refcounts)
            assert victim is not None, "caller checked availability"
            self.index.remove_leaf(victim)
            self.counters.evictions += 1
            block = victim.block
        self.pool.incref(block)
        return block

    def _release(self, block: int, now: int) -> None:
        """D4: drops one reference. An indexed block stays cached (and is touched); an unindexed
        block that nobody references any more joins the free queue's tail."""
        refcount = self.pool.decref(block)
        node = self.index.node_of_block.get(block)
        if node is not None:
            node.last_used = now
        elif refcount == 0:
            self.pool.push_free(block)

    def _window_releases(self, seq: Sequence) -> list[int]:
        """Rule 10: the held blocks wholly before the window of the next query (at len)."""
        dead = blocks_before_window(len(seq.tokens), self.config.window, self.config.block_size)
        return [block for block in seq.table[:dead] if block != HOLE]

    def _release_before_window(self, seq: Sequence, now: int) -> None:
        """Rule 10: releases those blocks, front to back, leaving holes in the table."""
        dead = blocks_before_window(len(seq.tokens), self.config.window, self.config.block_size)
        for i in range(dead):
            if seq.table[i] != HOLE:
                self._release(seq.table[i], now)
                seq.table[i] = HOLE

    def _copy_on_write_tail(self, seq: Sequence, now: int) -> None:
        """Rule 1, D3: a fresh block gets the tail's visible rows in every layer and replaces it in
        the table; the old block is released (D4)."""
        old = seq.table[-1]
        new = self._allocate()
        if self.storage is not None:
            self.storage.copy_rows(old, new, len(seq.tokens) % self.config.block_size)
        seq.table[-1] = new
        self._release(old, now)
        self.counters.cow_copies += 1

    def _extend_plan(self, seq: Sequence, num_new: int) -> tuple[bool, int]:
        """(does the tail need copy-on-write, how many blocks past the tail) for num_new tokens."""
        size = self.config.block_size
        tail_rows = len(seq.tokens) % size
        cow = tail_rows != 0 and not self._is_writable(seq.table[-1])
        grow = blocks_for(len(seq.tokens) + num_new, size) - len(seq.table)
        return cow, grow

    def _decode_plans(self, seqs: list[Sequence]) -> list[tuple[bool, int]]:
        """(copy the tail, blocks past it) per sequence of a decode step.

        Plans in batch order, as a loop of extends would see it: copying one sequence's shared
        tail, or releasing blocks before its window, drops references, which can leave a later
        sequence's tail exclusive (no copy)."""
        dropped: dict[int, int] = {}
        plans = []
        for seq in seqs:
            for block in self._window_releases(seq):
                dropped[block] = dropped.get(block, 0) + 1
            cow, grow = self._extend_plan(seq, 1)
            if cow and self.pool.refcounts[seq.table[-1]] - dropped.get(seq.table[-1], 0) == 1:
                cow = seq.table[-1] in self.index.node_of_block  # exclusive now, unless indexed
            if cow:
                dropped[seq.table[-1]] = dropped.get(seq.table[-1], 0) + 1
            plans.append((cow, grow))
        return plans
