"""Block pool metadata: refcounts and the FIFO free queue (O(1) push/pop)."""

from __future__ import annotations

from collections import deque


class BlockPool:
    __slots__ = ("refcounts", "free_queue")

    def __init__(self, num_blocks: int) -> None:
        self.refcounts = [0] * num_blocks  # a Python list: scalar updates are cheapest here
        self.free_queue: deque[int] = deque(range(num_blocks))
