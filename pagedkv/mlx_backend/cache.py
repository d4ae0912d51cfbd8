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

from pagedkv import errors
from pagedkv.config import Config, ceil_div
from pagedkv.mlx_backend import checks, observe
from pagedkv.mlx_backend.allocation import Allocation
from pagedkv.mlx_backend.index import PrefixIndex
from pagedkv.mlx_backend.kv import KVOperations
from pagedkv.mlx_backend.pool import BlockPool
from pagedkv.mlx_backend.sequence import Counters, Sequence
from pagedkv.mlx_backend.storage import KVStorage
from pagedkv.mlx_backend.threads import serialised
from pagedkv.mlx_backend.window import trim_uncovers_hole


@serialised  # one call at a time per cache, from any thread (see threads.py)
class PagedCache(Allocation, KVOperations):
    """The MLX implementation. See `pagedkv.spec.PagedCache` for each operation's contract."""

    def __init__(self, config: Config) -> None:
        if not isinstance(config, Config):
            raise errors.not_a_config(config)
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
        self.counters = Counters()

    # ---- small helpers -------------------------------------------------------------------------

    def _sequence(self, seq_id: object) -> Sequence:
        # Handles are ints (Python or NumPy); 1.0 or True must not find sequence 1.
        seq = None
        if type(seq_id) is int:
            seq = self.sequences.get(seq_id)
        elif checks.is_integer(seq_id):  # NumPy integers, int subclasses such as IntEnum
            seq = self.sequences.get(int(seq_id))  # type: ignore[call-overload]
        if seq is not None:
            return seq
        raise errors.unknown_sequence(seq_id, self.sequences)

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _is_writable(self, block: int) -> bool:
        return self.pool.refcounts[block] == 1 and block not in self.index.by_block

    def blocks_available(self, pinned: set[int] | None = None) -> int:
        return len(self.pool.free_queue) + self.index.reclaimable(pinned or set())

    def _require_blocks(self, needed: int, pinned: set[int], asked: str) -> None:
        if needed <= len(self.pool.free_queue) + len(self.index.evictable) - len(pinned):
            return  # fast bound: every current evictable leaf is one block
        available = self.blocks_available(pinned)
        if needed > available:
            raise errors.out_of_blocks(asked, needed, available, self.config.num_blocks)

    def _prompt_keys(self, tokens: list[int]):
        """Rule 3: the keys of full blocks a prompt may match, leaving at least one token. A
        generator, not the spec's list: `index.match` stops at the first miss, so a long prompt
        with a short hit builds only the keys it looks up."""
        size = self.size
        return (tuple(tokens[i * size : (i + 1) * size]) for i in range((len(tokens) - 1) // size))

    # ---- reserve: add_sequence and extend ------------------------------------------------------

    def _chain(self, tokens, namespace, max_cached, asked: str):
        tokens = checks.as_tokens(tokens, asked)
        namespace = checks.as_namespace(namespace)
        cap = None if max_cached is None else checks.as_count(max_cached, "max_cached")
        chain = self.index.match(namespace, self._prompt_keys(tokens))
        if cap is not None:
            del chain[cap // self.size :]
        return tokens, namespace, chain

    def prefix_match(self, tokens, namespace: str = "") -> int:
        return len(self._chain(tokens, namespace, None, "prefix_match")[2]) * self.size

    def can_add_sequence(self, tokens, namespace: str = "", max_cached: int | None = None) -> bool:
        tokens, _, chain = self._chain(tokens, namespace, max_cached, "can_add_sequence")
        needed = ceil_div(len(tokens), self.size) - len(chain)
        return needed <= self.blocks_available({n.block for n in chain})

    def add_sequence(
        self, tokens, namespace: str = "", max_cached: int | None = None
    ) -> tuple[int, int]:
        tokens, namespace, chain = self._chain(tokens, namespace, max_cached, "add_sequence")
        needed = ceil_div(len(tokens), self.size) - len(chain)
        pinned = {n.block for n in chain if self.pool.refcounts[n.block] == 0}
        self._require_blocks(needed, pinned, f"add_sequence({len(tokens)} tokens)")
        now, refcounts = self._tick(), self.pool.refcounts
        table = np.empty(max(8, len(chain) + needed), np.int32)
        for i, node in enumerate(chain):
            refcounts[node.block] += 1
            node.last_used = now
            if refcounts[node.block] == 1:
                self.index.referenced(node)
            table[i] = node.block
        for i in range(len(chain), len(chain) + needed):
            table[i] = self._allocate()
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
        counters = self.counters
        counters.prefix_queries += 1
        counters.prompt_tokens += len(tokens)
        counters.prefix_hit_tokens += cached
        counters.prefill_tokens_avoided += cached
        return seq.id, cached

    def can_extend(self, seq_id: int, num_tokens: int) -> bool:
        seq = self._sequence(seq_id)
        num_tokens = checks.as_count(num_tokens, "num_tokens")
        if num_tokens == 0:  # decision D11 of the spec's rules
            raise errors.can_extend_zero()
        cow, grow = self._extend_plan(seq, num_tokens)
        return cow + grow <= self.blocks_available()

    def extend(self, seq_id: int, tokens) -> None:
        seq = self._sequence(seq_id)
        tokens = checks.as_tokens(tokens, "extend")
        cow, grow = self._extend_plan(seq, len(tokens))
        if cow or grow:
            self._require_blocks(cow + grow, set(), f"extend(sequence {seq.id}, {len(tokens)})")
        now = self._tick()
        if self.config.window is not None:
            self._release_before_window(seq, now)
        if cow:
            self._copy_on_write_tail(seq, now)
        for _ in range(grow):
            seq.append_block(self._allocate())
        seq.tokens += tokens

    def decode_step(self, seq_ids, tokens) -> None:
        if type(seq_ids) is not list:
            seq_ids = checks.as_batch(seq_ids, "decode_step seq_ids")
        sequences = self.sequences  # the hot path: plain int handles, one dict lookup each
        seqs = [sequences.get(s) if type(s) is int else None for s in seq_ids]
        if None in seqs:
            seqs = [self._sequence(seq_id) for seq_id in seq_ids]
        tokens = checks.as_tokens(tokens, "decode_step")
        if len(set(map(id, seqs))) != len(seqs) or len(tokens) != len(seqs) or not seqs:
            distinct = len(set(map(id, seqs)))
            raise errors.not_one_token_each(len(seqs), distinct, len(tokens))
        plans = self._decode_plans(seqs)
        needed = sum(cow + grow for cow, grow in plans)
        if needed:
            self._require_blocks(needed, set(), f"decode_step({len(seqs)} sequences)")
        now = self._tick()
        window = self.config.window
        for seq, token, (cow, grow) in zip(seqs, tokens, plans):
            if window is not None:
                self._release_before_window(seq, now)
            if cow:
                self._copy_on_write_tail(seq, now)
            elif grow:  # one token grows by at most one block, never after a copy
                seq.append_block(self._allocate())
            seq.tokens.append(token)

    def can_decode_step(self, seq_ids) -> bool:
        seqs = [self._sequence(s) for s in checks.as_batch(seq_ids, "can_decode_step seq_ids")]
        if len(set(map(id, seqs))) != len(seqs) or not seqs:
            raise errors.not_distinct("can_decode_step", len(seqs), len(set(map(id, seqs))))
        needed = sum(cow + grow for cow, grow in self._decode_plans(seqs))
        return needed <= self.blocks_available()

    # ---- commit -----------------------------------------------------------------------------

    def commit(self, seq_id: int) -> int:
        seq = self._sequence(seq_id)
        now, size, index = self._tick(), self.size, self.index
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
                self.counters.duplicates += 1
            path.append(node)
            parent = node
        seq.committed = full
        return published

    # ---- fork, trim, free ----------------------------------------------------------------------

    def fork(self, seq_id: int) -> int:
        parent = self._sequence(seq_id)
        self._tick()
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
        self.counters.prefill_tokens_avoided += len(parent.tokens)
        return child.id

    def trim(self, seq_id: int, num_tokens: int) -> None:
        seq = self._sequence(seq_id)
        num_tokens = checks.as_count(num_tokens, "trim num_tokens")
        if num_tokens > len(seq.tokens):
            raise errors.trim_too_long(num_tokens, seq.id, len(seq.tokens))
        length, window = len(seq.tokens) - num_tokens, self.config.window
        if trim_uncovers_hole(length, seq.holes, window, self.size):
            most = len(seq.tokens) - seq.holes * self.size - window
            raise errors.trim_reaches_released(num_tokens, seq.id, window, most)
        now = self._tick()
        keep = ceil_div(length, self.size)
        for block in seq.table[keep : seq.num_blocks][::-1].tolist():
            self._release(block, now)
        seq.num_blocks = keep
        del seq.tokens[length:]
        seq.committed = min(seq.committed, length // self.size)
        del seq.path[seq.committed :]

    def free(self, seq_id: int) -> None:
        seq = self._sequence(seq_id)
        now = self._tick()
        for block in seq.held()[::-1]:
            self._release(block, now)
        del self.sequences[seq.id]

    # ---- the prefix cache ----------------------------------------------------------------------

    def evict(self, num_blocks: int) -> list[int]:
        num_blocks = checks.as_count(num_blocks, "evict num_blocks")
        self._tick()
        evicted = []
        while len(evicted) < num_blocks and self.index.evictable:
            evicted.append(self.index.pop_lru_leaf().block)
        self.pool.free_queue.extend(evicted)
        self.counters.evictions += len(evicted)
        return evicted

    def clear_cache(self) -> int:
        self._tick()
        cached = self.index.clear()
        self.pool.free_queue.extend(cached)
        self.counters.evictions += len(cached)
        return len(cached)

    # ---- observation ---------------------------------------------------------------------------

    def sequence_length(self, seq_id: int) -> int:
        return len(self._sequence(seq_id).tokens)

    def tokens(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self._sequence(seq_id).tokens)

    def block_table(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self._sequence(seq_id).blocks())

    def block_table_array(self, seq_id: int) -> np.ndarray:
        """The live int32 block table (a view: do not modify), ready for a kernel."""
        seq = self._sequence(seq_id)
        return seq.table[: seq.num_blocks]

    # Observation lives in its own module (K/V writes, reads and attention in kv.py).
    stats = observe.stats
    snapshot = observe.snapshot
    check_invariants = observe.check_invariants
