"""The block pool: a refcount per block and the FIFO queue of free blocks.

A block is *free* when its refcount is 0 and the prefix index does not hold it. Free blocks wait in
a first-in first-out queue that starts as 0, 1, ..., N-1 (rule 5). Allocation pops the head; a block
that becomes free joins the tail. Which block an allocation returns is therefore a pure function of
the history of operations, so two implementations can be compared block id for block id.
"""

from __future__ import annotations

from collections import deque

from pagedkv.config import ceil_div


def blocks_for(num_tokens: int, block_size: int) -> int:
    """ceil(num_tokens / block_size): the table length of a sequence of that many tokens."""
    return ceil_div(num_tokens, block_size)


class BlockPool:
    """Refcounts and the free queue. Knows nothing of sequences or the prefix index."""

    def __init__(self, num_blocks: int) -> None:
        self.refcounts: list[int] = [0] * num_blocks
        self.free_queue: deque[int] = deque(range(num_blocks))

    def num_free(self) -> int:
        return len(self.free_queue)

    def pop_free(self) -> int:
        """Precondition: the queue is not empty. Returns the head."""
        return self.free_queue.popleft()

    def push_free(self, block: int) -> None:
        """Precondition: `block` has refcount 0 and is not indexed. It joins the tail."""
        self.free_queue.append(block)

    def incref(self, block: int) -> None:
        self.refcounts[block] += 1

    def decref(self, block: int) -> int:
        """Drops one reference and returns the new refcount."""
        self.refcounts[block] -= 1
        return self.refcounts[block]
