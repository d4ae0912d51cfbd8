"""Rule 10, sliding windows, for the backend (mirrors `pagedkv.spec.window`, which explains it).

The backend keeps each sequence's count of leading holes (`Sequence.holes`) instead of scanning
its table for them; everything else is the same arithmetic.
"""

from __future__ import annotations

HOLE = -1  # the table entry of a released block


def blocks_before_window(first_query: int, window: int | None, block_size: int) -> int:
    """Leading blocks wholly at or before `first_query - window` (0 without a window)."""
    if window is None:
        return 0
    return max(0, (first_query - window + 1) // block_size)


def trim_uncovers_hole(new_length: int, holes: int, window: int | None, block_size: int) -> bool:
    """Whether the last position after trimming to `new_length` would need a released key."""
    return bool(holes) and window is not None and new_length - window < holes * block_size
