"""Observation of the spec's state: stats, a comparable snapshot, and the invariant checks.

These only read. `check_invariants` restates the design brief's invariants over the state kept by
`pagedkv.spec.cache.PagedCache`.
"""

from __future__ import annotations

from pagedkv.errors import InvariantError
from pagedkv.spec.pool import blocks_for
from pagedkv.spec.window import HOLE, blocks_before_window, leading_holes
from pagedkv.types import IndexEntry, SequenceEntry, Snapshot, Stats


def stats(cache) -> Stats:
    """Derived block states plus the event counters."""
    refcounts, indexed = cache.pool.refcounts, cache.index.node_of_block
    rows_held: dict[int, int] = {}
    for seq in cache.sequences.values():
        for i, block in enumerate(seq.table):
            if block == HOLE:
                continue
            rows = min(cache.config.block_size, len(seq.tokens) - i * cache.config.block_size)
            rows_held[block] = max(rows_held.get(block, 0), rows)
    return Stats(
        free_blocks=cache.pool.num_free(),
        cached_blocks=sum(1 for b in indexed if refcounts[b] == 0),
        in_use_blocks=sum(1 for r in refcounts if r >= 1),
        shared_blocks=sum(1 for r in refcounts if r >= 2),
        indexed_blocks=len(indexed),
        sequences=len(cache.sequences),
        tokens_stored=sum(len(s.tokens) for s in cache.sequences.values()),
        unique_tokens=sum(rows_held.values()),
        **vars(cache.counters),
    )


def snapshot(cache) -> Snapshot:
    """Every observable piece of metadata, as plain comparable data."""
    entries = [
        IndexEntry(n.namespace, n.path_tokens(), n.block, n.last_used) for n in cache.index.nodes()
    ]
    return Snapshot(
        clock=cache.clock,
        next_sequence_id=cache.next_sequence_id,
        free_queue=tuple(cache.pool.free_queue),
        refcounts=tuple(cache.pool.refcounts),
        sequences=tuple(
            SequenceEntry(s.id, s.namespace, tuple(s.tokens), tuple(s.table), s.committed)
            for s in sorted(cache.sequences.values(), key=lambda s: s.id)
        ),
        index=tuple(sorted(entries, key=lambda e: (e.namespace, e.path_tokens))),
        stats=stats(cache),
    )


def check_invariants(cache) -> None:
    """Raises InvariantError naming the first broken invariant of the design brief."""
    size, refcounts = cache.config.block_size, cache.pool.refcounts

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise InvariantError(message)

    counted = [0] * cache.config.num_blocks
    for seq in cache.sequences.values():
        require(
            len(seq.table) == blocks_for(len(seq.tokens), size),
            f"sequence {seq.id}: table length != ceil(len / block_size)",
        )
        holes = leading_holes(seq.table)
        require(HOLE not in seq.table[holes:], f"sequence {seq.id}: a hole after a held block")
        require(
            holes <= blocks_before_window(len(seq.tokens), cache.config.window, size),
            f"sequence {seq.id}: a released block is still inside the window",
        )
        for block in seq.table[holes:]:
            counted[block] += 1
    require(counted == refcounts, "refcount != occurrences in block tables")
    queue = list(cache.pool.free_queue)
    require(len(queue) == len(set(queue)), "free queue holds a block twice")
    indexed = cache.index.node_of_block
    expected_free = {
        b for b in range(cache.config.num_blocks) if refcounts[b] == 0 and b not in indexed
    }
    require(set(queue) == expected_free, "free queue != unreferenced, unindexed blocks")
    nodes = cache.index.nodes()
    require(len({n.block for n in nodes}) == len(nodes), "two index nodes share a block")
    for node in nodes:
        require(indexed.get(node.block) is node, "node_of_block out of sync")
        siblings = cache.index.children_of(node.namespace, node.parent)
        require(siblings.get(node.key) is node, "index node not reachable from its parent")
        require(len(node.key) == size, "index node key is not a full block")
    for seq in cache.sequences.values():
        for i, block in enumerate(seq.table):
            if block == HOLE:
                continue
            node = indexed.get(block)
            end = min(len(seq.tokens), (i + 1) * size)
            require(
                node is None or node.path_tokens()[:end] == tuple(seq.tokens[:end]),
                f"sequence {seq.id} holds indexed block {block} under other tokens",
            )
    writable_owners = [
        b for s in cache.sequences.values() for b in s.table if b != HOLE and cache._is_writable(b)
    ]
    require(len(writable_owners) == len(set(writable_owners)), "a block writable twice")
