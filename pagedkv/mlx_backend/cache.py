"""PagedCache on MLX: the spec's contract, with metadata written for speed and K/V on the device.

Same operations, names, results and errors as `pagedkv.spec.PagedCache`, whose docstrings are the
contracts (the rules, decisions and invariants are numbered in `pagedkv.spec.rules`); none of its
code is shared. What differs is how:
O(1) free queue, hashed trie lookups, a lazily invalidated LRU heap of evictable leaves, a count of
reclaimable blocks kept up to date as refcounts change (admission costs O(request), never
O(cached blocks)), commits that resume from the last committed node, and block tables kept as
int32 arrays.
"""

from __future__ import annotations

import numpy as np

from pagedkv.config import Config
from pagedkv.errors import (
    ConfigError,
    InvalidArgumentError,
    OutOfBlocksError,
    TrimError,
    UnknownSequenceError,
)
from pagedkv.mlx_backend import observe, validate
from pagedkv.mlx_backend.index import Node, PrefixIndex
from pagedkv.mlx_backend.kv import KVOperations
from pagedkv.mlx_backend.pool import BlockPool
from pagedkv.mlx_backend.storage import KVStorage
from pagedkv.mlx_backend.threads import locked_methods


class Sequence:
    __slots__ = (
        "id",
        "namespace",
        "tokens",
        "table",
        "num_blocks",
        "committed",
        "path",
        "epoch",
        "holes",
    )

    def __init__(
        self,
        seq_id: int,
        namespace: str,
        tokens: list[int],
        table: np.ndarray,
        num_blocks: int,
        committed: int,
        path: list[Node],
        epoch: int,
        holes: int = 0,
    ) -> None:
        self.id = seq_id
        self.namespace = namespace
        self.tokens = tokens
        self.table = table  # int32 buffer with spare capacity; the live part is [:num_blocks]
        self.num_blocks = num_blocks
        self.committed = committed
        self.path = path  # index nodes of the committed blocks, valid while epoch matches
        self.epoch = epoch
        self.holes = holes  # leading table entries released by the window (-1), rule 10

    def append_block(self, block: int) -> None:
        if self.num_blocks == len(self.table):
            grown = np.empty(max(8, 2 * len(self.table)), np.int32)
            grown[: self.num_blocks] = self.table[: self.num_blocks]
            self.table = grown
        self.table[self.num_blocks] = block
        self.num_blocks += 1

    def blocks(self) -> list[int]:
        return self.table[: self.num_blocks].tolist()

    def held(self) -> list[int]:
        """The table without its holes."""
        return self.table[self.holes : self.num_blocks].tolist()


@locked_methods  # one call at a time per cache, from any thread (see threads.py)
class PagedCache(KVOperations):
    """The MLX implementation. See `pagedkv.spec.PagedCache` for each operation's contract."""

    def __init__(self, config: Config) -> None:
        if not isinstance(config, Config):
            raise ConfigError(f"PagedCache needs a pagedkv.Config, got {type(config).__name__}.")
        self.config = config
        self.size = config.block_size
        self.pool = BlockPool(config.num_blocks)
        self.index = PrefixIndex(self.pool.refcounts)
        self.storage = KVStorage(config) if config.store_kv else None
        self.sequences: dict[int, Sequence] = {}
        self.clock = 0
        self._plans: dict[tuple, object] = {}  # write slots of the current tick (see _planned_runs)
        self._plans_clock = 0
        self.next_sequence_id = 0
        self.counts = dict.fromkeys(
            (
                "prefix_queries",
                "prompt_tokens",
                "prefix_hit_tokens",
                "prefill_tokens_avoided",
                "cow_copies",
                "evictions",
                "duplicates",
            ),
            0,
        )

    # ---- internals -----------------------------------------------------------------------------

    def _seq(self, seq_id: object) -> Sequence:
        # Handles are ints (Python or NumPy); 1.0 or True must not find sequence 1.
        seq = None
        if type(seq_id) is int:
            seq = self.sequences.get(seq_id)
        elif validate.is_int(seq_id):  # NumPy integers, int subclasses such as IntEnum
            seq = self.sequences.get(int(seq_id))  # type: ignore[call-overload]
        if seq is not None:
            return seq
        raise UnknownSequenceError(
            f"sequence {seq_id!r} is unknown or was freed ({len(self.sequences)} live); use a "
            "handle returned by add_sequence or fork."
        )

    def _writable(self, block: int) -> bool:
        return self.pool.refcounts[block] == 1 and block not in self.index.by_block

    def blocks_available(self, pinned: set[int] | None = None) -> int:
        return len(self.pool.free_queue) + self.index.reclaimable(pinned or set())

    def _ensure(self, needed: int, pinned: set[int], asked: str) -> None:
        if needed <= len(self.pool.free_queue) + len(self.index.evictable) - len(pinned):
            return  # fast bound: every current evictable leaf is one block
        available = self.blocks_available(pinned)
        if needed > available:
            raise OutOfBlocksError(
                f"{asked} needs {needed} new blocks but only {available} are free or evictable "
                f"(of {self.config.num_blocks}); free or trim sequences, or use a larger pool."
            )

    def _take_block(self) -> int:
        refcounts = self.pool.refcounts
        if self.pool.free_queue:
            block = self.pool.free_queue.popleft()
        else:
            block = self.index.pop_lru_leaf().block
            self.counts["evictions"] += 1
        refcounts[block] = 1
        return block

    def _drop(self, block: int, now: int) -> None:
        refcounts = self.pool.refcounts
        refcounts[block] -= 1
        node = self.index.by_block.get(block)
        if node is not None:
            node.last_used = now
            if refcounts[block] == 0:
                self.index.released(node)
        elif refcounts[block] == 0:
            self.pool.free_queue.append(block)

    def _slide(self, seq: Sequence, now: int) -> None:
        """Rule 10: drops the blocks wholly before the next query's window, front to back."""
        dead = (len(seq.tokens) - self.config.window + 1) // self.size
        while seq.holes < dead:
            self._drop(seq.table.item(seq.holes), now)
            seq.table[seq.holes] = -1
            seq.holes += 1

    # ---- reserve -------------------------------------------------------------------------------

    def _match(self, tokens: list[int], namespace: str) -> list[Node]:
        size, chain, parent = self.size, [], None
        for i in range((len(tokens) - 1) // size):
            node = self.index.child(namespace, parent, tuple(tokens[i * size : (i + 1) * size]))
            if node is None:
                break
            chain.append(node)
            parent = node
        return chain

    def _prompt(self, tokens, namespace, max_cached, asked: str):
        tokens = validate.token_list(tokens, asked)
        namespace = validate.namespace(namespace)
        cap = None if max_cached is None else validate.count(max_cached, "max_cached")
        chain = self._match(tokens, namespace)
        if cap is not None:
            del chain[cap // self.size :]
        return tokens, namespace, chain

    def prefix_match(self, tokens, namespace: str = "") -> int:
        return len(self._prompt(tokens, namespace, None, "prefix_match")[2]) * self.size

    def can_add_sequence(self, tokens, namespace: str = "", max_cached: int | None = None) -> bool:
        tokens, _, chain = self._prompt(tokens, namespace, max_cached, "can_add_sequence")
        needed = -(-len(tokens) // self.size) - len(chain)
        return needed <= self.blocks_available({n.block for n in chain})

    def add_sequence(
        self, tokens, namespace: str = "", max_cached: int | None = None
    ) -> tuple[int, int]:
        tokens, namespace, chain = self._prompt(tokens, namespace, max_cached, "add_sequence")
        needed = -(-len(tokens) // self.size) - len(chain)
        pinned = {n.block for n in chain if self.pool.refcounts[n.block] == 0}
        self._ensure(needed, pinned, f"add_sequence({len(tokens)} tokens)")
        self.clock += 1
        now, refcounts = self.clock, self.pool.refcounts
        table = np.empty(max(8, len(chain) + needed), np.int32)
        for i, node in enumerate(chain):
            refcounts[node.block] += 1
            node.last_used = now
            if refcounts[node.block] == 1:
                self.index.referenced(node)
            table[i] = node.block
        for i in range(len(chain), len(chain) + needed):
            table[i] = self._take_block()
        seq = Sequence(
            self.next_sequence_id,
            namespace,
            tokens,
            table,
            len(chain) + needed,
            len(chain),
            chain,
            self.index.epoch,
        )
        self.sequences[seq.id] = seq
        self.next_sequence_id += 1
        cached = len(chain) * self.size
        counts = self.counts
        counts["prefix_queries"] += 1
        counts["prompt_tokens"] += len(tokens)
        counts["prefix_hit_tokens"] += cached
        counts["prefill_tokens_avoided"] += cached
        return seq.id, cached

    def _plan(self, seq: Sequence, new_tokens: int) -> tuple[bool, int]:
        length = len(seq.tokens)
        cow = length % self.size != 0 and not self._writable(int(seq.table[seq.num_blocks - 1]))
        return cow, -(-(length + new_tokens) // self.size) - seq.num_blocks

    def can_extend(self, seq_id: int, num_tokens: int) -> bool:
        seq = self._seq(seq_id)
        num_tokens = validate.count(num_tokens, "num_tokens")
        if num_tokens == 0:  # decision D11 of the spec's rules
            raise InvalidArgumentError(
                "can_extend num_tokens must be >= 1 (extend takes at least one token), got 0."
            )
        cow, grow = self._plan(seq, num_tokens)
        return cow + grow <= self.blocks_available()

    def extend(self, seq_id: int, tokens) -> None:
        seq = self._seq(seq_id)
        tokens = validate.token_list(tokens, "extend")
        cow, grow = self._plan(seq, len(tokens))
        if cow or grow:
            self._ensure(cow + grow, set(), f"extend(sequence {seq.id}, {len(tokens)})")
        self.clock += 1
        if self.config.window is not None:
            self._slide(seq, self.clock)
        if cow:
            self._copy_tail(seq, self.clock)
        for _ in range(grow):
            seq.append_block(self._take_block())
        seq.tokens += tokens

    def decode_step(self, seq_ids, tokens) -> None:
        if type(seq_ids) is not list:
            seq_ids = validate.batch(seq_ids, "decode_step seq_ids")
        sequences = self.sequences  # the hot path: plain int handles, one dict lookup each
        seqs = [sequences.get(s) if type(s) is int else None for s in seq_ids]
        if None in seqs:
            seqs = [self._seq(seq_id) for seq_id in seq_ids]
        tokens = validate.token_list(tokens, "decode_step")
        if len(set(map(id, seqs))) != len(seqs) or len(tokens) != len(seqs) or not seqs:
            raise InvalidArgumentError(
                f"decode_step needs distinct sequences and one token each; got {len(seqs)} "
                f"sequences and {len(tokens)} tokens."
            )
        needed, cows = self._decode_plan(seqs)
        if needed:
            self._ensure(needed, set(), f"decode_step({len(seqs)} sequences)")
        self.clock += 1
        window = self.config.window
        for seq, token, cow in zip(seqs, tokens, cows):
            if window is not None:
                self._slide(seq, self.clock)
            if cow:
                self._copy_tail(seq, self.clock)
            elif cow is None:
                seq.append_block(self._take_block())
            seq.tokens.append(token)

    def can_decode_step(self, seq_ids) -> bool:
        seqs = [self._seq(s) for s in validate.batch(seq_ids, "can_decode_step seq_ids")]
        if len(set(map(id, seqs))) != len(seqs) or not seqs:
            raise InvalidArgumentError(
                f"can_decode_step needs distinct sequences; got {len(seqs)} sequences."
            )
        return self._decode_plan(seqs)[0] <= self.blocks_available()

    def _decode_plan(self, seqs: list[Sequence]) -> tuple[int, list]:
        """(blocks needed, per sequence: True copy the tail / None a new block / False nothing)."""
        size, refcounts, indexed = self.size, self.pool.refcounts, self.index.by_block
        needed, cows, dropped, window = 0, [], None, self.config.window
        for seq in seqs:  # inline _plan: this loop is the per-token hot path of a server
            if window is not None:  # blocks this step's window releases drop references too
                for i in range(seq.holes, (len(seq.tokens) - window + 1) // size):
                    dropped = dropped if dropped is not None else {}
                    block = seq.table.item(i)
                    dropped[block] = dropped.get(block, 0) + 1
            if len(seq.tokens) % size:
                tail = seq.table.item(seq.num_blocks - 1)
                cow = refcounts[tail] != 1 or tail in indexed
                if cow:  # a copy earlier in this batch may have left this tail exclusive
                    dropped = dropped if dropped is not None else {}
                    cow = refcounts[tail] - dropped.get(tail, 0) != 1 or tail in indexed
                    if cow:
                        dropped[tail] = dropped.get(tail, 0) + 1
            else:
                cow = None  # a fresh block past the tail
            needed += cow is not False
            cows.append(cow)
        return needed, cows

    def _copy_tail(self, seq: Sequence, now: int) -> None:
        old = int(seq.table[seq.num_blocks - 1])
        new = self._take_block()
        if self.storage is not None:
            self.storage.copy_rows(old, new, len(seq.tokens) % self.size)
        seq.table[seq.num_blocks - 1] = new
        self._drop(old, now)
        self.counts["cow_copies"] += 1

    # ---- commit -----------------------------------------------------------------------------

    def commit(self, seq_id: int) -> int:
        seq = self._seq(seq_id)
        self.clock += 1
        now, size, index = self.clock, self.size, self.index
        full = len(seq.tokens) // size
        if seq.epoch != index.epoch:  # a node was removed since: re-walk from the root
            seq.path, seq.epoch = [], index.epoch
        # The path holds the walked nodes from the root: resume after them. It can be shorter
        # than `committed` when an earlier walk stopped at a block the window released.
        published, path, tokens = 0, seq.path, seq.tokens
        parent = path[-1] if path else None
        for i in range(len(path), full):
            key = tuple(tokens[i * size : (i + 1) * size])
            node = index.child(seq.namespace, parent, key)
            block = int(seq.table[i])
            if node is None:
                if block < 0:  # rule 10: a released block is never published
                    break
                node = index.insert(seq.namespace, parent, key, block, now)
                published += 1
            elif node.block != block and block >= 0 and i >= seq.committed:
                self.counts["duplicates"] += 1
            path.append(node)
            parent = node
        seq.committed = full
        return published

    # ---- fork, trim, free, eviction ------------------------------------------------------------

    def fork(self, seq_id: int) -> int:
        parent = self._seq(seq_id)
        self.clock += 1
        refcounts = self.pool.refcounts
        for block in parent.held():
            refcounts[block] += 1
        child = Sequence(
            self.next_sequence_id,
            parent.namespace,
            list(parent.tokens),
            parent.table.copy(),
            parent.num_blocks,
            parent.committed,
            list(parent.path),
            parent.epoch,
            parent.holes,
        )
        self.sequences[child.id] = child
        self.next_sequence_id += 1
        self.counts["prefill_tokens_avoided"] += len(parent.tokens)
        return child.id

    def trim(self, seq_id: int, num_tokens: int) -> None:
        seq = self._seq(seq_id)
        num_tokens = validate.count(num_tokens, "trim num_tokens")
        if num_tokens > len(seq.tokens):
            raise TrimError(
                f"trim({num_tokens}) of sequence {seq.id}, which holds {len(seq.tokens)} tokens; "
                "trim at most its length."
            )
        length, window = len(seq.tokens) - num_tokens, self.config.window
        if seq.holes and length - window < seq.holes * self.size:
            raise TrimError(
                f"trim({num_tokens}) of sequence {seq.id}: its last position would need K/V the "
                f"sliding window ({window}) released (rule 10); trim at most "
                f"{len(seq.tokens) - seq.holes * self.size - window}."
            )
        self.clock += 1
        keep = -(-length // self.size)
        for block in seq.table[keep : seq.num_blocks][::-1].tolist():
            self._drop(block, self.clock)
        seq.num_blocks = keep
        del seq.tokens[length:]
        seq.committed = min(seq.committed, length // self.size)
        del seq.path[seq.committed :]

    def free(self, seq_id: int) -> None:
        seq = self._seq(seq_id)
        self.clock += 1
        for block in seq.held()[::-1]:
            self._drop(block, self.clock)
        del self.sequences[seq.id]

    def evict(self, num_blocks: int) -> list[int]:
        num_blocks = validate.count(num_blocks, "evict num_blocks")
        self.clock += 1
        evicted = []
        while len(evicted) < num_blocks and self.index.evictable:
            evicted.append(self.index.pop_lru_leaf().block)
        self.pool.free_queue.extend(evicted)
        self.counts["evictions"] += len(evicted)
        return evicted

    def clear_cache(self) -> int:
        self.clock += 1
        cached = self.index.clear()
        self.pool.free_queue.extend(cached)
        self.counts["evictions"] += len(cached)
        return len(cached)

    # ---- reads ---------------------------------------------------------------------------------

    def sequence_length(self, seq_id: int) -> int:
        return len(self._seq(seq_id).tokens)

    def tokens(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self._seq(seq_id).tokens)

    def block_table(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self._seq(seq_id).blocks())

    def block_table_array(self, seq_id: int) -> np.ndarray:
        """The live int32 block table (a view: do not modify), ready for a kernel."""
        seq = self._seq(seq_id)
        return seq.table[: seq.num_blocks]

    # Observation lives in its own module (K/V writes, reads and attention in kv.py).
    stats = observe.stats
    snapshot = observe.snapshot
    check_invariants = observe.check_invariants
