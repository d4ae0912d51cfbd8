"""The prefix index: a radix trie whose nodes are full, committed blocks.

A node's key is the tuple of the `block_size` tokens its block holds; its path from the root is the
token prefix it caches. Each namespace has its own root, so lookups never cross namespaces.

The index holds no reference on a block. A block whose refcount is 0 but which is still indexed is
*cached*: it can be matched again by a later prompt, or evicted when blocks run out.

Eviction (rule 6) removes only *leaves* (nodes without children) whose block has refcount 0: the one
used least recently first, by the logical clock, ties broken by the lowest block id. A node's
`last_used` tick is set when it is published, when a prompt matches it, and whenever a sequence
releases its block (decision D4).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class Node:
    block: int
    key: tuple[int, ...]
    namespace: str
    parent: Node | None  # None for the top level of a namespace
    last_used: int
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)

    def path_tokens(self) -> tuple[int, ...]:
        """All tokens from the root down to and including this node."""
        keys: list[tuple[int, ...]] = []
        node: Node | None = self
        while node is not None:
            keys.append(node.key)
            node = node.parent
        return tuple(token for key in reversed(keys) for token in key)


class PrefixIndex:
    """The trie. `roots[namespace]` maps a first-block key to its node."""

    def __init__(self) -> None:
        self.roots: dict[str, dict[tuple[int, ...], Node]] = {}
        self.node_of_block: dict[int, Node] = {}

    def children_of(self, namespace: str, parent: Node | None) -> dict[tuple[int, ...], Node]:
        if parent is None:
            return self.roots.get(namespace, {})
        return parent.children

    def match(self, namespace: str, blocks_of_tokens: list[tuple[int, ...]]) -> list[Node]:
        """Follows the keys from the root; returns the nodes of the longest indexed chain."""
        chain: list[Node] = []
        parent: Node | None = None
        for key in blocks_of_tokens:
            child = self.children_of(namespace, parent).get(key)
            if child is None:
                break
            chain.append(child)
            parent = child
        return chain

    def insert(
        self, namespace: str, parent: Node | None, key: tuple[int, ...], block: int, now: int
    ) -> Node:
        """Precondition: no child with `key` under `parent`, and `block` is not indexed."""
        node = Node(block=block, key=key, namespace=namespace, parent=parent, last_used=now)
        if parent is None:
            self.roots.setdefault(namespace, {})[key] = node
        else:
            parent.children[key] = node
        self.node_of_block[block] = node
        return node

    def remove_leaf(self, node: Node) -> None:
        """Precondition: `node` has no children."""
        siblings = self.children_of(node.namespace, node.parent)
        del siblings[node.key]
        if node.parent is None and not siblings:
            del self.roots[node.namespace]
        del self.node_of_block[node.block]

    def clear(self) -> None:
        self.roots.clear()
        self.node_of_block.clear()

    def nodes(self) -> list[Node]:
        return list(self.node_of_block.values())

    def evictable_leaves(self, refcounts: list[int]) -> list[Node]:
        return [n for n in self.nodes() if not n.children and refcounts[n.block] == 0]

    def lru_leaf(self, refcounts: list[int]) -> Node | None:
        """The next victim of rule 6, or None when nothing is evictable."""
        leaves = self.evictable_leaves(refcounts)
        return min(leaves, key=lambda n: (n.last_used, n.block), default=None)

    def reclaimable(self, refcounts: list[int], pinned: set[int]) -> int:
        """How many blocks eviction could free, repeating leaf evictions as parents become leaves.

        A cached node is reclaimable iff no block in its subtree is referenced or pinned.
        The spec walks the whole trie on every call (O(indexed blocks)), for clarity; the MLX
        backend keeps this count up to date as refcounts change, so its admission costs O(request).
        """

        def count(node: Node) -> tuple[int, bool]:
            total, clean = 0, True
            for child in node.children.values():
                sub_total, sub_clean = count(child)
                total, clean = total + sub_total, clean and sub_clean
            clean = clean and refcounts[node.block] == 0 and node.block not in pinned
            return total + (1 if clean else 0), clean

        return sum(count(top)[0] for level in self.roots.values() for top in level.values())
