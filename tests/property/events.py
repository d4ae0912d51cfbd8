"""How often the state machines reach each rule: counted from the snapshots around every operation.

`EVENTS` accumulates over a test session; `tools/rule_coverage.py` runs the differential machine and
prints it, and `test_rule_coverage.py` demands that a short run reaches every event.
"""

from __future__ import annotations

from collections import Counter

from pagedkv.config import ceil_div
from pagedkv.types import Snapshot

EVENTS: Counter[str] = Counter()

PRESSURE_OPS = ("add_sequence", "extend", "decode_step")


def record(op: str, args: tuple, before: Snapshot, after: Snapshot, outcome: tuple) -> None:
    """Counts the rules an operation exercised, given the snapshots around it and its outcome."""
    EVENTS[f"op {op} {outcome[0]}"] += 1
    if outcome == ("error", _out_of_blocks()):
        EVENTS["rule 7: out of blocks, nothing changed"] += 1
        if op == "add_sequence" and _pinning_decides(args, before):
            EVENTS["rule 3/7: out of blocks only because the prompt's own matches are pinned"] += 1
    if outcome[0] != "ok":
        return
    b, a = before.stats, after.stats
    indexed_before = {e.block for e in before.index}
    if op == "add_sequence" and outcome[1][1]:
        EVENTS["rule 3: prefix hit"] += 1
        seq = outcome[1][0]
        table = next(s.table for s in after.sequences if s.id == seq)
        if any(before.refcounts[blk] == 0 for blk in table if blk in indexed_before):
            EVENTS["rule 3: a cached (refcount 0) block reused"] += 1
    if a.cow_copies > b.cow_copies:
        EVENTS["rule 1: copy-on-write"] += 1
    if a.duplicates > b.duplicates:
        EVENTS["rule 4: duplicate kept"] += 1
    if a.evictions > b.evictions and op in PRESSURE_OPS:
        EVENTS["rule 6: eviction under pressure"] += 1
        if any(before.refcounts[e.block] for e in before.index):
            EVENTS["rule 6: eviction while indexed blocks are referenced"] += 1
        if len(before.free_queue) == 0:
            EVENTS["rule 5/6: allocation with an empty free queue"] += 1
    if op == "evict" and outcome[1]:
        EVENTS["rule 6: evict() evicted"] += 1
    if op in ("trim", "free"):
        touched = {e.block for e in after.index if e.last_used == after.clock}
        if touched & indexed_before:
            EVENTS["rule 6: release touches an indexed block"] += 1
    if op == "trim" and after.refcounts != before.refcounts:
        EVENTS["rule 8: trim released blocks"] += 1
    if op == "fork":
        EVENTS["rule 9: fork"] += 1


def _pinning_decides(args: tuple, before: Snapshot) -> bool:
    """Would add_sequence have fitted if the cached blocks its prompt matches counted as
    reclaimable? (Rule 3 pins them first, so they must not.)"""
    if not before.index:
        return False
    size = min(len(e.path_tokens) for e in before.index)
    tokens = tuple(int(t) for t in args[0])
    namespace = args[1] if len(args) > 1 else ""
    matched = {
        e.block
        for e in before.index
        if e.namespace == namespace
        and len(e.path_tokens) <= (len(tokens) - 1) // size * size
        and tokens[: len(e.path_tokens)] == e.path_tokens
    }
    needed = ceil_div(len(tokens), size) - len(matched)
    free = len(before.free_queue)
    return free + _reclaimable(before, set()) >= needed > free + _reclaimable(before, matched)


def _reclaimable(before: Snapshot, pinned: set[int]) -> int:
    """Cached nodes with no referenced or pinned block in their subtree."""
    blocked = set()
    for e in before.index:
        if before.refcounts[e.block] or e.block in pinned:
            blocked |= {
                o.block
                for o in before.index
                if o.namespace == e.namespace
                and e.path_tokens[: len(o.path_tokens)] == o.path_tokens
            }
    return len(before.index) - len(blocked)


def _out_of_blocks() -> type:
    from pagedkv.errors import OutOfBlocksError

    return OutOfBlocksError
