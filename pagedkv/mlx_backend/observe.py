"""stats(), snapshot() and check_invariants() of the MLX backend (methods of PagedCache)."""

from __future__ import annotations

from pagedkv.errors import InvariantError
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
        **vars(cache.counters),
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


def check_invariants(cache) -> None:
    """The design brief's invariants, plus the backend's own structures (heap, caches)."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise InvariantError(what)

    n, size = cache.config.num_blocks, cache.size
    refcounts, index = cache.pool.refcounts, cache.index
    seen = [0] * n
    for seq in cache.sequences.values():
        need(seq.num_blocks == -(-len(seq.tokens) // size), f"seq {seq.id}: table length")
        blocks = seq.blocks()
        need(all(b < 0 for b in blocks[: seq.holes]), f"seq {seq.id}: holes are not -1")
        need(min(seq.held(), default=0) >= 0, f"seq {seq.id}: a hole after a held block")
        window = cache.config.window
        need(
            not seq.holes or seq.holes <= (len(seq.tokens) - window + 1) // size,
            f"seq {seq.id}: a released block is still inside the window",
        )
        for block in seq.held():
            seen[block] += 1
    need(seen == refcounts, "refcount != occurrences in block tables")
    queue = list(cache.pool.free_queue)
    need(len(set(queue)) == len(queue), "free queue holds a block twice")
    need(
        set(queue) == {b for b in range(n) if not refcounts[b] and b not in index.by_block},
        "free queue != unreferenced, unindexed blocks",
    )
    for (parent, key), node in index.children.items():
        need(index.by_block.get(node.block) is node, "by_block out of sync")
        need(
            parent == index.parent_key(node.namespace, node.parent) and key == node.key,
            "child key out of sync",
        )
        need(len(key) == size, "index key is not a full block")
    need(len(index.children) == len(index.by_block), "index dicts differ in size")
    child_counts: dict[int, int] = {}
    for node in index.by_block.values():
        if node.parent is not None:
            child_counts[node.parent.block] = child_counts.get(node.parent.block, 0) + 1
    for block, node in index.by_block.items():
        need(node.children == child_counts.get(block, 0), f"child count of block {block}")
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
        need(node.blocked == (block in blocked), f"blocked flag of block {block}")
        need(node.blocked_children == blocked_kids.get(block, 0), f"blocked children of {block}")
    need(index.num_blocked == len(blocked), "blocked count")
    leaves = {b for b, nd in index.by_block.items() if nd.children == 0 and not refcounts[b]}
    need(index.evictable == leaves, "evictable set != cached leaves")
    live = {(lu, b) for lu, b in index.heap}
    need(all((index.by_block[b].last_used, b) in live for b in leaves), "heap misses a leaf")
    need(not index.heap or index.heap[0] == min(index.heap), "heap order")
    for seq in cache.sequences.values():
        blocks = seq.blocks()
        for i, block in enumerate(blocks):
            if block < 0:
                continue
            node = index.by_block.get(block)
            end = min(len(seq.tokens), (i + 1) * size)
            need(
                node is None or node.path_tokens()[:end] == tuple(seq.tokens[:end]),
                f"seq {seq.id} holds indexed block {block} under other tokens",
            )
        if seq.epoch == index.epoch:
            need(len(seq.path) <= seq.committed, f"seq {seq.id}: committed path length")
            need(
                all(index.by_block.get(nd.block) is nd for nd in seq.path),
                f"seq {seq.id}: committed path points at removed nodes",
            )
