"""stats(), snapshot() and check_invariants() of the MLX backend (methods of PagedCache).

Same contracts as the spec's (`pagedkv.spec.observe`): the invariants I1..I11 of
`pagedkv.spec.rules`, checked by this module's own code, then B1..B5 for the backend's own
structures.
"""

from __future__ import annotations

from dataclasses import asdict

from pagedkv.config import ceil_div
from pagedkv.errors import InvariantError
from pagedkv.mlx_backend.window import blocks_before_window
from pagedkv.types import IndexEntry, SequenceEntry, Snapshot, Stats


def stats(cache) -> Stats:
    refcounts, indexed, size = cache.pool.refcounts, cache.index.by_block, cache.size
    rows_held: dict[int, int] = {}
    for seq in cache.sequences.values():
        length = len(seq.tokens)
        for i, block in enumerate(seq.blocks()):
            if block < 0:
                continue
            rows = min(size, length - i * size)
            if rows > rows_held.get(block, 0):
                rows_held[block] = rows
    in_use = sum(1 for r in refcounts if r)
    cached = sum(1 for b in indexed if not refcounts[b])
    return Stats(
        free_blocks=len(cache.pool.free_queue),
        cached_blocks=cached,
        in_use_blocks=in_use,
        shared_blocks=sum(1 for r in refcounts if r > 1),
        indexed_blocks=len(indexed),
        sequences=len(cache.sequences),
        tokens_stored=sum(len(s.tokens) for s in cache.sequences.values()),
        unique_tokens=sum(rows_held.values()),
        **asdict(cache.counters),
    )


def snapshot(cache) -> Snapshot:
    entries = sorted(
        (
            IndexEntry(n.namespace, n.path_tokens(), n.block, n.last_used)
            for n in cache.index.by_block.values()
        ),
        key=lambda e: (e.namespace, e.path_tokens),
    )
    return Snapshot(
        clock=cache.clock,
        next_sequence_id=cache.next_sequence_id,
        free_queue=tuple(cache.pool.free_queue),
        refcounts=tuple(cache.pool.refcounts),
        sequences=tuple(
            SequenceEntry(s.id, s.namespace, tuple(s.tokens), tuple(s.blocks()), s.committed)
            for s in sorted(cache.sequences.values(), key=lambda s: s.id)
        ),
        index=tuple(entries),
        stats=stats(cache),
    )


# The invariants of `pagedkv.spec.rules` (the spec states each with its reason), checked here with
# the backend's own code; B1..B5 check the backend's own structures, which the spec does not have.
INVARIANTS = {
    "I1": "Table length",
    "I2": "Holes are a prefix",
    "I3": "Holes lie before the window",
    "I4": "Refcounts count table entries",
    "I5": "The free queue holds no block twice",
    "I6": "Free means unreferenced and unindexed",
    "I7": "Index nodes are distinct full blocks",
    "I8": "The index is consistent",
    "I9": "Held indexed blocks hold their tokens",
    "I10": "No block is writable by two sequences",
    "I11": "Bookkeeping is bounded",
    "B1": "The hole count matches the table",
    "B2": "Child counts match the index",
    "B3": "Blocked flags match a recount",
    "B4": "The evictable set and heap match the cached leaves",
    "B5": "Committed paths point at live nodes",
}


def check_invariants(cache) -> None:
    """Checks I1..I11 (`pagedkv.spec.rules`, in the spec's order), then the backend's own B1..B5:
    B1 `Sequence.holes` equals the table's leading -1 entries; B2 each node's child count; B3 the
    blocked flags, blocked-children counts and `num_blocked` (the reclaimable count, ADR 0003)
    equal a recount; B4 the evictable set is the cached leaves and the heap holds each in order;
    B5 a sequence's remembered commit path (current epoch) holds only live nodes, no more than
    its committed blocks. Raises InvariantError for the first that fails, its number first."""

    def need(ok: bool, label: str, detail: str) -> None:
        if not ok:
            raise InvariantError(f"{label} {INVARIANTS[label]}: {detail}")

    n, size, window = cache.config.num_blocks, cache.size, cache.config.window
    refcounts, index = cache.pool.refcounts, cache.index
    seen = [0] * n
    leading: dict[int, int] = {}
    for seq in cache.sequences.values():
        length = len(seq.tokens)
        need(
            seq.num_blocks == ceil_div(length, size),
            "I1",
            f"sequence {seq.id} has {length} tokens and {seq.num_blocks} table entries",
        )
        blocks = seq.blocks()
        holes = next((i for i, b in enumerate(blocks) if b >= 0), len(blocks))
        leading[seq.id] = holes
        need(all(b >= 0 for b in blocks[holes:]), "I2", f"sequence {seq.id} has {blocks}")
        need(
            holes <= blocks_before_window(length, window, size),
            "I3",
            f"sequence {seq.id} ({length} tokens) has {holes} holes",
        )
        for block in blocks[holes:]:
            seen[block] += 1
    for block in range(n):
        need(
            seen[block] == refcounts[block],
            "I4",
            f"block {block} has refcount {refcounts[block]} but {seen[block]} table entries",
        )
    queue = list(cache.pool.free_queue)
    need(len(set(queue)) == len(queue), "I5", f"free queue {queue}")
    free = {b for b in range(n) if not refcounts[b] and b not in index.by_block}
    need(set(queue) == free, "I6", f"free queue {sorted(queue)}, expected {sorted(free)}")
    nodes = list(index.children.values())
    need(
        len({nd.block for nd in nodes}) == len(nodes),
        "I7",
        f"nodes hold blocks {sorted(nd.block for nd in nodes)}",
    )
    for node in nodes:
        need(len(node.key) == size, "I7", f"block {node.block} has key {node.key}")
    for (parent, key), node in index.children.items():
        need(index.by_block.get(node.block) is node, "I8", f"block {node.block} by_block")
        need(
            parent == index.parent_key(node.namespace, node.parent) and key == node.key,
            "I8",
            f"block {node.block} is not under its parent by its key",
        )
        need(
            node.parent is None or index.by_block.get(node.parent.block) is node.parent,
            "I8",
            f"block {node.block} has a parent outside the index",
        )
    need(
        len(index.children) == len(index.by_block),
        "I8",
        f"{len(index.children)} children entries, {len(index.by_block)} by_block entries",
    )
    for seq in cache.sequences.values():
        for i, block in enumerate(seq.blocks()):
            node = index.by_block.get(block) if block >= 0 else None
            end = min(len(seq.tokens), (i + 1) * size)
            need(
                node is None or node.path_tokens()[:end] == tuple(seq.tokens[:end]),
                "I9",
                f"sequence {seq.id} holds indexed block {block} under other tokens",
            )
    writable: dict[int, int] = {}
    for seq in cache.sequences.values():
        for block in seq.held():
            if cache._is_writable(block):
                writable[block] = writable.get(block, 0) + 1
    need(max(writable.values(), default=0) <= 1, "I10", f"writable entries {writable}")
    for seq in cache.sequences.values():
        need(seq.id < cache.next_sequence_id, "I11", f"sequence {seq.id}")
        need(
            seq.committed <= len(seq.tokens) // size,
            "I11",
            f"sequence {seq.id} has {seq.committed} committed blocks",
        )
    late = [b for b, nd in index.by_block.items() if nd.last_used > cache.clock]
    need(not late, "I11", f"blocks {late} used after tick {cache.clock}")
    _check_backend_structures(cache, leading, need)


def _check_backend_structures(cache, leading: dict[int, int], need) -> None:
    """B1..B5: the caches and counters the spec does not keep."""
    refcounts, index = cache.pool.refcounts, cache.index
    for seq in cache.sequences.values():
        need(seq.holes == leading[seq.id], "B1", f"sequence {seq.id}: holes {seq.holes}")
    child_counts: dict[int, int] = {}
    for node in index.by_block.values():
        if node.parent is not None:
            child_counts[node.parent.block] = child_counts.get(node.parent.block, 0) + 1
    for block, node in index.by_block.items():
        need(node.children == child_counts.get(block, 0), "B2", f"child count of block {block}")
    blocked = {b for b in index.by_block if refcounts[b]}  # recomputed from scratch
    for block in list(blocked):
        node = index.by_block[block].parent
        while node is not None and node.block not in blocked:
            blocked.add(node.block)
            node = node.parent
    blocked_kids: dict[int, int] = {}
    for block in blocked:
        parent = index.by_block[block].parent
        if parent is not None:
            blocked_kids[parent.block] = blocked_kids.get(parent.block, 0) + 1
    for block, node in index.by_block.items():
        need(node.blocked == (block in blocked), "B3", f"blocked flag of block {block}")
        need(
            node.blocked_children == blocked_kids.get(block, 0),
            "B3",
            f"blocked children of {block}",
        )
    need(index.num_blocked == len(blocked), "B3", "blocked count")
    leaves = {b for b, nd in index.by_block.items() if nd.children == 0 and not refcounts[b]}
    need(index.evictable == leaves, "B4", "evictable set != cached leaves")
    live = set(index.heap)
    need(all((index.by_block[b].last_used, b) in live for b in leaves), "B4", "heap misses a leaf")
    need(not index.heap or index.heap[0] == min(index.heap), "B4", "heap order")
    for seq in cache.sequences.values():
        if seq.epoch == index.epoch:
            need(len(seq.path) <= seq.committed, "B5", f"sequence {seq.id}: path length")
            need(
                all(index.by_block.get(nd.block) is nd for nd in seq.path),
                "B5",
                f"sequence {seq.id}: committed path points at removed nodes",
            )
