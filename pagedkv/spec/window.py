"""Rule 10, sliding windows: which blocks a windowed cache no longer needs.

With `Config.window = W`, the query at position q attends to the keys at positions (q - W, q].
Positions only grow between trims, so once the first query of an extend sits at position n, no
present or future query sees a position at or before n - W. A block whose every position is at or
before n - W is dead: `extend` and `decode_step` release it and leave a *hole* in its table entry.

- Holes are a prefix of the table (release goes front to back), so `holes * block_size` is the
  first position whose K/V is still held.
- A hole is never written, committed or matched. A released block that was committed before stays
  cached in the prefix index, with its K/V intact: still a correct prefix for later requests. One
  that was never committed joins the free queue like any released block.
- When the releases happen within an operation, and how each operation treats a hole, is
  decision D10 (`pagedkv.spec.rules`).
- Trim may not uncover a hole: after trimming to length m, the sequence's last position m - 1
  (the query decode attention asks about) needs keys from m - W on, so a trim is refused unless
  those are all still held.
"""

from __future__ import annotations

HOLE = -1  # the table entry of a released block


def blocks_before_window(first_query: int, window: int | None, block_size: int) -> int:
    """How many leading blocks lie wholly at or before `first_query - window` (0 without a
    window): block i does when its last position (i + 1) * block_size - 1 <= first_query - window.
    """
    if window is None:
        return 0
    return max(0, (first_query - window + 1) // block_size)


def leading_holes(table: list[int]) -> int:
    """How many table entries, from the front, are holes."""
    count = 0
    while count < len(table) and table[count] == HOLE:
        count += 1
    return count


def trim_uncovers_hole(new_length: int, holes: int, window: int | None, block_size: int) -> bool:
    """Whether trimming to `new_length` would leave the last position (new_length - 1) a key it
    needs inside a released block: it needs positions new_length - window onwards."""
    if window is None or holes == 0:
        return False
    return new_length - window < holes * block_size
