"""The prefix index, built for speed.

Children are found by hashing `(parent, key)` in one dict, where `parent` is the parent's block id
or, at the top level, the namespace string (the two cannot collide). Evictable leaves (refcount 0,
no children) are kept in a set plus a min-heap of `(last_used, block)` whose stale entries are
skipped when popped, so the LRU victim costs O(log n) and never a scan.

How many cached blocks repeated eviction could reclaim is kept up to date too, so admission never
scans the index. A node is *blocked* when its block is referenced or a child is blocked: eviction
can never reach it. Each node counts its blocked children; a refcount change or an insertion
updates the node and walks up only while an ancestor's blocked state flips, so the cost is bounded
by the chain the operation touches (O(request)), never by the number of cached blocks.
"""

from __future__ import annotations

import heapq


class Node:
    __slots__ = (
        "block",
        "key",
        "namespace",
        "parent",
        "children",
        "last_used",
        "blocked",
        "blocked_children",
    )

    def __init__(self, block: int, key: tuple, namespace: str, parent: Node | None, now: int):
        self.block = block
        self.key = key
        self.namespace = namespace
        self.parent = parent
        self.children = 0  # number of child nodes
        self.last_used = now
        self.blocked = False  # referenced, or a child is blocked: eviction cannot reach it
        self.blocked_children = 0

    def path_tokens(self) -> tuple[int, ...]:
        keys, node = [], self
        while node is not None:
            keys.append(node.key)
            node = node.parent
        return tuple(t for key in reversed(keys) for t in key)


class PrefixIndex:
    def __init__(self, refcounts: list[int]) -> None:
        self.refcounts = refcounts  # shared with the BlockPool
        self.children: dict[tuple[object, tuple], Node] = {}
        self.by_block: dict[int, Node] = {}
        self.evictable: set[int] = set()
        self.heap: list[tuple[int, int]] = []
        self.epoch = 0  # bumped whenever a node is removed: cached paths must be re-walked
        self.num_blocked = 0  # indexed nodes eviction cannot reach; the rest are reclaimable

    @staticmethod
    def parent_key(namespace: str, parent: Node | None) -> object:
        return namespace if parent is None else parent.block

    def child(self, namespace: str, parent: Node | None, key: tuple) -> Node | None:
        return self.children.get((namespace if parent is None else parent.block, key))

    def match(self, namespace: str, keys) -> list[Node]:
        """Follows the keys (any iterable, consumed only up to the first miss) from the root;
        returns the nodes of the longest indexed chain."""
        chain: list[Node] = []
        parent = None
        for key in keys:
            node = self.child(namespace, parent, key)
            if node is None:
                break
            chain.append(node)
            parent = node
        return chain

    def mark_if_evictable(self, node: Node) -> None:
        if node.children == 0 and self.refcounts[node.block] == 0:
            self.evictable.add(node.block)
            heapq.heappush(self.heap, (node.last_used, node.block))
            if len(self.heap) > 2 * len(self.by_block) + 64:  # drop stale entries now and then
                self.heap = [(self.by_block[b].last_used, b) for b in self.evictable]
                heapq.heapify(self.heap)

    def update_blocked(self, node: Node | None) -> None:
        """Recomputes `node.blocked` after its refcount or blocked children changed, and walks up
        while the flag flips (an unchanged node leaves its ancestors unchanged)."""
        while node is not None:
            blocked = self.refcounts[node.block] > 0 or node.blocked_children > 0
            if blocked == node.blocked:
                return
            node.blocked = blocked
            self.num_blocked += 1 if blocked else -1
            if node.parent is not None:
                node.parent.blocked_children += 1 if blocked else -1
            node = node.parent

    def referenced(self, node: Node) -> None:
        """The node's block went from refcount 0 to 1."""
        self.evictable.discard(node.block)
        self.update_blocked(node)

    def released(self, node: Node) -> None:
        """The node's block dropped to refcount 0."""
        self.mark_if_evictable(node)
        self.update_blocked(node)

    def insert(self, namespace: str, parent: Node | None, key: tuple, block: int, now: int) -> Node:
        node = Node(block, key, namespace, parent, now)
        self.children[(self.parent_key(namespace, parent), key)] = node
        self.by_block[block] = node
        if parent is not None:
            parent.children += 1
            self.evictable.discard(parent.block)
        self.mark_if_evictable(node)
        self.update_blocked(node)
        return node

    def pop_lru_leaf(self) -> Node:
        """Removes and returns the rule-6 victim. Precondition: `evictable` is not empty."""
        while True:
            last_used, block = heapq.heappop(self.heap)
            if block in self.evictable and self.by_block[block].last_used == last_used:
                node = self.by_block[block]
                self.remove_leaf(node)
                return node

    def remove_leaf(self, node: Node) -> None:
        """Removes an evictable leaf. It has no children and no references, so it is not blocked
        and no blocked count changes."""
        del self.children[(self.parent_key(node.namespace, node.parent), node.key)]
        del self.by_block[node.block]
        self.evictable.discard(node.block)
        self.epoch += 1
        parent = node.parent
        if parent is not None:
            parent.children -= 1
            self.mark_if_evictable(parent)

    def reclaimable(self, pinned: set[int]) -> int:
        """Cached blocks repeated leaf eviction could reach: unblocked nodes, less those that
        pinning `pinned` would block (each pinned node and its unblocked ancestors).
        Costs O(pinned chains), not O(index)."""
        newly_blocked: set[int] = set()
        for block in pinned:
            node = self.by_block.get(block)
            while node is not None and not node.blocked and node.block not in newly_blocked:
                newly_blocked.add(node.block)
                node = node.parent
        return len(self.by_block) - self.num_blocked - len(newly_blocked)

    def clear(self) -> list[int]:
        """Drops every node; returns the cached (refcount 0) blocks in ascending order."""
        cached = sorted(b for b in self.by_block if self.refcounts[b] == 0)
        self.children.clear()
        self.by_block.clear()
        self.evictable.clear()
        self.heap.clear()
        self.epoch += 1
        self.num_blocked = 0
        return cached
