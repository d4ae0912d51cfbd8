"""The prefix index, built for speed.

Children are found by hashing `(parent, key)` in one dict, where `parent` is the parent's block id
or, at the top level, the namespace string (the two cannot collide). Evictable leaves (refcount 0,
no children) are kept in a set plus a min-heap of `(last_used, block)` whose stale entries are
skipped when popped, so the LRU victim costs O(log n) and never a scan.
"""

from __future__ import annotations

import heapq


class Node:
    __slots__ = ("block", "key", "namespace", "parent", "children", "last_used")

    def __init__(self, block: int, key: tuple, namespace: str, parent: Node | None, now: int):
        self.block = block
        self.key = key
        self.namespace = namespace
        self.parent = parent
        self.children = 0  # number of child nodes
        self.last_used = now

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

    @staticmethod
    def parent_key(namespace: str, parent: Node | None) -> object:
        return namespace if parent is None else parent.block

    def child(self, namespace: str, parent: Node | None, key: tuple) -> Node | None:
        return self.children.get((namespace if parent is None else parent.block, key))

    def mark_if_evictable(self, node: Node) -> None:
        if node.children == 0 and self.refcounts[node.block] == 0:
            self.evictable.add(node.block)
            heapq.heappush(self.heap, (node.last_used, node.block))
            if len(self.heap) > 2 * len(self.by_block) + 64:  # drop stale entries now and then
                self.heap = [(self.by_block[b].last_used, b) for b in self.evictable]
                heapq.heapify(self.heap)

    def insert(self, namespace: str, parent: Node | None, key: tuple, block: int, now: int) -> Node:
        node = Node(block, key, namespace, parent, now)
        self.children[(self.parent_key(namespace, parent), key)] = node
        self.by_block[block] = node
        if parent is not None:
            parent.children += 1
            self.evictable.discard(parent.block)
        self.mark_if_evictable(node)
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
        del self.children[(self.parent_key(node.namespace, node.parent), node.key)]
        del self.by_block[node.block]
        self.evictable.discard(node.block)
        self.epoch += 1
        parent = node.parent
        if parent is not None:
            parent.children -= 1
            self.mark_if_evictable(parent)

    def reclaimable(self, pinned: set[int]) -> int:
        """Cached blocks repeated leaf eviction could reach: indexed, refcount 0, not pinned, and
        with no referenced or pinned block below them."""
        blocked: set[int] = set()
        for block, node in self.by_block.items():
            if self.refcounts[block] or block in pinned:
                while node is not None and node.block not in blocked:
                    blocked.add(node.block)
                    node = node.parent
        return len(self.by_block) - len(blocked)

    def clear(self) -> list[int]:
        """Drops every node; returns the cached (refcount 0) blocks in ascending order."""
        cached = sorted(b for b in self.by_block if self.refcounts[b] == 0)
        self.children.clear()
        self.by_block.clear()
        self.evictable.clear()
        self.heap.clear()
        self.epoch += 1
        return cached
