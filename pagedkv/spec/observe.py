"""Observation of the spec's state: stats, a comparable snapshot, and the invariant checks.

These only read. `check_invariants` verifies the invariants I1..I11 listed in
`pagedkv.spec.rules` over the state kept by `pagedkv.spec.cache.PagedCache`.
"""

from __future__ import annotations

from collections import Counter

from pagedkv.errors import InvariantError
from pagedkv.spec import rules
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
    """Checks invariants I1..I11 of `pagedkv.spec.rules`, in order.

    Raises:
        InvariantError: for the first that fails; the message starts with its number, e.g.
            "I4 Refcounts count table entries: ...". Changes nothing either way.
    """
    size, refcounts, window = cache.config.block_size, cache.pool.refcounts, cache.config.window
    titles = rules.invariants()

    def require(ok: bool, label: str, detail: str) -> None:
        if not ok:
            raise InvariantError(f"{label} {titles[label]}: {detail}")

    counted = [0] * cache.config.num_blocks
    for seq in cache.sequences.values():
        want = blocks_for(len(seq.tokens), size)
        require(
            len(seq.table) == want,
            "I1",
            f"sequence {seq.id} has {len(seq.tokens)} tokens and {len(seq.table)} table entries, "
            f"not {want}",
        )
        holes = leading_holes(seq.table)
        require(HOLE not in seq.table[holes:], "I2", f"sequence {seq.id} has {seq.table}")
        require(
            holes <= blocks_before_window(len(seq.tokens), window, size),
            "I3",
            f"sequence {seq.id} ({len(seq.tokens)} tokens, window {window}) has {holes} holes",
        )
        for block in seq.table[holes:]:
            counted[block] += 1
    for block, (refcount, entries) in enumerate(zip(refcounts, counted)):
        require(
            refcount == entries,
            "I4",
            f"block {block} has refcount {refcount} but {entries} table entries",
        )
    queue = list(cache.pool.free_queue)
    require(len(queue) == len(set(queue)), "I5", f"free queue {queue}")
    indexed = cache.index.node_of_block
    expected_free = {
        b for b in range(cache.config.num_blocks) if refcounts[b] == 0 and b not in indexed
    }
    require(
        set(queue) == expected_free,
        "I6",
        f"free queue {sorted(queue)}, unreferenced unindexed blocks {sorted(expected_free)}",
    )
    nodes = cache.index.nodes()
    blocks = [n.block for n in nodes]
    require(len(set(blocks)) == len(blocks), "I7", f"nodes hold blocks {sorted(blocks)}")
    for node in nodes:
        require(len(node.key) == size, "I7", f"block {node.block} has key {node.key}")
    reachable = _reachable(cache.index)
    for node in nodes:
        require(indexed.get(node.block) is node, "I8", f"block {node.block} is registered apart")
        siblings = cache.index.children_of(node.namespace, node.parent)
        require(siblings.get(node.key) is node, "I8", f"block {node.block} not under its parent")
    require(
        len(reachable) == len(nodes),
        "I8",
        f"{len(reachable)} nodes reachable from the roots, {len(nodes)} registered",
    )
    for seq in cache.sequences.values():
        for i, block in enumerate(seq.table):
            node = indexed.get(block) if block != HOLE else None
            end = min(len(seq.tokens), (i + 1) * size)
            require(
                node is None or node.path_tokens()[:end] == tuple(seq.tokens[:end]),
                "I9",
                f"sequence {seq.id} holds indexed block {block} under other tokens",
            )
    writable = [
        b for s in cache.sequences.values() for b in s.table if b != HOLE and cache._is_writable(b)
    ]
    twice = sorted(b for b, n in Counter(writable).items() if n > 1)
    require(not twice, "I10", f"blocks {twice}")
    for seq in cache.sequences.values():
        require(
            seq.id < cache.next_sequence_id,
            "I11",
            f"sequence {seq.id}, next id {cache.next_sequence_id}",
        )
        require(
            seq.committed <= len(seq.tokens) // size,
            "I11",
            f"sequence {seq.id} has {seq.committed} committed of {len(seq.tokens) // size} full "
            "blocks",
        )
    late = [n.block for n in nodes if n.last_used > cache.clock]
    require(not late, "I11", f"blocks {late} used after tick {cache.clock}")


def _reachable(index) -> list:
    """Every node reachable from the namespace roots through children."""
    found, stack = [], [n for level in index.roots.values() for n in level.values()]
    while stack:
        node = stack.pop()
        found.append(node)
        stack.extend(node.children.values())
    return found
