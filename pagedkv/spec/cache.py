"""PagedCache: sequences, block tables, and every metadata operation of the contract.

Read `pagedkv.spec.rules` first: it numbers the rules (1..10), the decisions that complete them
(D1..D11) and the invariants (I1..I11) cited here. Then read this module top to bottom; the K/V
operations (writes, gather, attention) are in `pagedkv.spec.kv`, and the block mechanics the
operations share (allocate, release, copy-on-write, plans) in `pagedkv.spec.allocation`.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf

from pagedkv import errors
from pagedkv.config import Config
from pagedkv.spec import checks, observe
from pagedkv.spec.allocation import Allocation
from pagedkv.spec.index import PrefixIndex
from pagedkv.spec.kv import KVOperations
from pagedkv.spec.pool import BlockPool, blocks_for
from pagedkv.spec.sequence import Counters, Sequence
from pagedkv.spec.storage import KVStorage
from pagedkv.spec.threads import serialised
from pagedkv.spec.window import HOLE, leading_holes, trim_uncovers_hole
from pagedkv.types import Snapshot, Stats


@serialised  # every public method holds self._lock: calls from several threads run one at a time
class PagedCache(Allocation, KVOperations):
    """The executable spec of a paged KV cache.

    Each public operation's docstring is its contract: Requires (arguments, as D6 defines them),
    Effects (the clock, refcounts, allocation order, stats), Returns, and Raises (each error, in the
    order the checks run). Stated once for all: every operation is all or nothing (rule 7), so after
    any error nothing has changed, clock and counters included; questions (`blocks_available`,
    `prefix_match`, the `can_*` methods) and reads change nothing and never tick (D1); a `seq_id`
    must be a live handle (issued by add_sequence or fork, not yet freed), else
    UnknownSequenceError.

    Raises:
        ConfigError: `config` is not a `pagedkv.Config`.
    """

    def __init__(self, config: Config) -> None:
        if not isinstance(config, Config):
            raise errors.not_a_config(config)
        self.config = config
        self.pool = BlockPool(config.num_blocks)
        self.index = PrefixIndex()
        self.storage = KVStorage(config) if config.store_kv else None
        self.sequences: dict[int, Sequence] = {}
        self.clock = 0
        self.next_sequence_id = 0
        self.counters = Counters()

    # ---- small helpers -------------------------------------------------------------------------

    def _sequence(self, seq_id: object) -> Sequence:
        is_handle = checks.is_integer(seq_id)
        seq = self.sequences.get(int(seq_id)) if is_handle else None  # type: ignore[arg-type]
        if seq is None:
            raise errors.unknown_sequence(seq_id, self.sequences)
        return seq

    def _tick(self) -> int:
        """D1: advances the logical clock, once a changing operation has passed its checks."""
        self.clock += 1
        return self.clock

    def _is_writable(self, block: int) -> bool:
        """Rule 1: refcount 1 and not indexed."""
        return self.pool.refcounts[block] == 1 and block not in self.index.node_of_block

    def blocks_available(self, pinned: set[int] | None = None) -> int:
        """How many fresh blocks an operation could get now (D2). A question: no tick.

        Requires:
            `pinned`: None or a set of block ids to treat as referenced (add_sequence pins the chain
            it matched); ids of blocks that are not cached change nothing and are not checked.

        Returns:
            Free blocks plus the cached blocks repeated leaf eviction could reach: a cached node
            counts when no block in its subtree is referenced or pinned.
        """
        return self.pool.num_free() + self.index.reclaimable(self.pool.refcounts, pinned or set())

    def _require_blocks(self, needed: int, pinned: set[int], asked: str) -> None:
        """D2: OutOfBlocksError unless `needed` blocks are available before the first change."""
        available = self.blocks_available(pinned)
        if needed > available:
            raise errors.out_of_blocks(asked, needed, available, self.config.num_blocks)

    def _prompt_keys(self, tokens: list[int]) -> list[tuple[int, ...]]:
        """Rule 3: the keys of full blocks a prompt may match, leaving at least one token."""
        size = self.config.block_size
        return [tuple(tokens[i * size : (i + 1) * size]) for i in range((len(tokens) - 1) // size)]

    # ---- reserve: add_sequence and extend ------------------------------------------------------

    def _chain(self, tokens, namespace, max_cached, asked: str):
        """(tokens, namespace, the indexed chain add_sequence would share), inputs checked."""
        tokens = checks.as_tokens(tokens, asked)
        namespace = checks.as_namespace(namespace)
        cap = None if max_cached is None else checks.as_count(max_cached, "max_cached")
        chain = self.index.match(namespace, self._prompt_keys(tokens))
        if cap is not None:
            chain = chain[: cap // self.config.block_size]
        return tokens, namespace, chain

    def prefix_match(self, tokens: SequenceOf[int], namespace: str = "") -> int:
        """How many prompt tokens add_sequence would serve from the index (rule 3). No tick.

        Requires:
            `tokens` a token sequence, `namespace` a str (D6).

        Returns:
            A multiple of block_size, less than len(tokens).

        Raises:
            InvalidTokensError: `tokens` is not a token sequence.
            InvalidArgumentError: `namespace` is not a str.
        """
        _, _, chain = self._chain(tokens, namespace, None, "prefix_match")
        return len(chain) * self.config.block_size

    def can_add_sequence(
        self, tokens: SequenceOf[int], namespace: str = "", max_cached: int | None = None
    ) -> bool:
        """Whether add_sequence with these arguments would find its blocks now. No tick.

        Requires:
            The arguments of add_sequence.

        Returns:
            True iff add_sequence would not raise OutOfBlocksError (D2).

        Raises:
            InvalidTokensError: as add_sequence.
            InvalidArgumentError: as add_sequence.
        """
        tokens, _, chain = self._chain(tokens, namespace, max_cached, "can_add_sequence")
        needed = blocks_for(len(tokens), self.config.block_size) - len(chain)
        return needed <= self.blocks_available({node.block for node in chain})

    def add_sequence(
        self, tokens: SequenceOf[int], namespace: str = "", max_cached: int | None = None
    ) -> tuple[int, int]:
        """Starts a sequence for a prompt, sharing its longest cached prefix (rules 2, 3).

        The caller then writes K/V for positions [cached, len) in every layer and commits.
        `max_cached` lets several caches holding one request's layers agree on one hit: each gets
        the shortest of their `prefix_match` results.

        Requires:
            `tokens` a token sequence, `namespace` a str, `max_cached` None or a count (D6).

        Effects:
            One tick. The matched chain (in `namespace`, one token left, capped to `max_cached //
            block_size` blocks) gets refcount + 1 and `last_used = now`; blocks for the remaining
            positions are then allocated in order (rule 5, evicting as rule 6 says). The handle is
            `next_sequence_id`, which grows by one. Stats: prefix_queries + 1, prompt_tokens + len,
            prefix_hit_tokens and prefill_tokens_avoided + cached, evictions + blocks evicted.

        Returns:
            (handle, cached): the new sequence and how many leading tokens the index served.

        Raises:
            InvalidTokensError: `tokens` is not a token sequence.
            InvalidArgumentError: `namespace` is not a str, or `max_cached` is not a count.
            OutOfBlocksError: too few blocks available; the matched ones are pinned, so do not
                count.
        """
        tokens, namespace, chain = self._chain(tokens, namespace, max_cached, "add_sequence")
        needed = blocks_for(len(tokens), self.config.block_size) - len(chain)
        self._require_blocks(
            needed, {n.block for n in chain}, f"add_sequence({len(tokens)} tokens)"
        )
        now = self._tick()
        for node in chain:
            self.pool.incref(node.block)
            node.last_used = now
        table = [node.block for node in chain] + [self._allocate() for _ in range(needed)]
        seq = Sequence(self.next_sequence_id, namespace, tokens, table, committed=len(chain))
        self.sequences[seq.id] = seq
        self.next_sequence_id += 1
        cached = len(chain) * self.config.block_size
        self.counters.prefix_queries += 1
        self.counters.prompt_tokens += len(tokens)
        self.counters.prefix_hit_tokens += cached
        self.counters.prefill_tokens_avoided += cached
        return seq.id, cached

    def can_extend(self, seq_id: int, num_tokens: int) -> bool:
        """Whether extend(seq_id, <num_tokens tokens>) would find its blocks now. No tick.

        Requires:
            A live handle; `num_tokens` an integer >= 1 (D11: extend takes at least one token).

        Returns:
            True iff the copy of a non-writable partial tail (D3) and the blocks past the tail fit
            in `blocks_available()`; blocks the window would release do not count (D10).

        Raises:
            UnknownSequenceError: `seq_id` is not a live handle.
            InvalidArgumentError: `num_tokens` is not an integer >= 1 (0 included, D11).
        """
        seq = self._sequence(seq_id)
        num_tokens = checks.as_count(num_tokens, "num_tokens")
        if num_tokens == 0:  # D11: no extend takes 0 tokens, so there is nothing to answer
            raise errors.can_extend_zero()
        cow, grow = self._extend_plan(seq, num_tokens)
        return int(cow) + grow <= self.blocks_available()

    def extend(self, seq_id: int, tokens: SequenceOf[int]) -> None:
        """Appends k >= 1 tokens (decode, a prefill chunk, drafts) and reserves them (rule 2).

        Requires:
            A live handle; `tokens` a token sequence.

        Effects:
            One tick. First the window's releases (rule 10, D10). Then, if the new tokens start
            inside a partial tail that is not writable (shared after fork, indexed after commit or
            trim), the copy-on-write of rule 1 and D3: a fresh block gets the tail's visible rows in
            every layer and replaces it, the old one is released (D4), cow_copies + 1. Then the
            blocks past the tail are allocated in order (rule 5, evicting as rule 6 says).

        Raises:
            UnknownSequenceError: `seq_id` is not a live handle.
            InvalidTokensError: `tokens` is not a token sequence.
            OutOfBlocksError: the copy and the new blocks do not fit in `blocks_available()`.
        """
        seq = self._sequence(seq_id)
        tokens = checks.as_tokens(tokens, "extend")
        cow, grow = self._extend_plan(seq, len(tokens))
        self._require_blocks(int(cow) + grow, set(), f"extend(sequence {seq.id}, {len(tokens)})")
        now = self._tick()
        self._release_before_window(seq, now)
        if cow:
            self._copy_on_write_tail(seq, now)
        seq.table.extend(self._allocate() for _ in range(grow))
        seq.tokens.extend(tokens)

    def decode_step(self, seq_ids: SequenceOf[int], tokens: SequenceOf[int]) -> None:
        """Extends each sequence of a batch by its one token, as one operation (D8).

        Exactly an in-order loop of `extend`: a fork whose shared tail its parent copied earlier in
        the batch has an exclusive tail and is not copied again.

        Requires:
            `seq_ids` a non-empty batch of distinct live handles; `tokens` one token per sequence.

        Effects:
            One tick for the batch; per sequence, in batch order, the effects of `extend`.

        Raises:
            InvalidArgumentError: `seq_ids` is not a batch.
            UnknownSequenceError: an element of `seq_ids` is not a live handle.
            InvalidTokensError: `tokens` is not a token sequence (so `decode_step([], [])` raises
                this, D11).
            InvalidArgumentError: an empty batch (D11), a sequence twice, or not one token each.
            OutOfBlocksError: the batch's copies and new blocks do not fit (D2).
        """
        seqs = [self._sequence(s) for s in checks.as_batch(seq_ids, "decode_step seq_ids")]
        tokens = checks.as_tokens(tokens, "decode_step")
        if len({seq.id for seq in seqs}) != len(seqs) or len(tokens) != len(seqs) or not seqs:
            raise errors.not_one_token_each(len(seqs), len({s.id for s in seqs}), len(tokens))
        plans = self._decode_plans(seqs)
        needed = sum(int(cow) + grow for cow, grow in plans)
        self._require_blocks(needed, set(), f"decode_step({len(seqs)} sequences)")
        now = self._tick()
        for seq, token, (cow, grow) in zip(seqs, tokens, plans):
            self._release_before_window(seq, now)
            if cow:
                self._copy_on_write_tail(seq, now)
            seq.table.extend(self._allocate() for _ in range(grow))
            seq.tokens.append(token)

    def can_decode_step(self, seq_ids: SequenceOf[int]) -> bool:
        """Whether decode_step(seq_ids, <one token each>) would find its blocks. No tick.

        Requires:
            `seq_ids` a non-empty batch of distinct live handles.

        Returns:
            True iff decode_step would not raise OutOfBlocksError (D2).

        Raises:
            InvalidArgumentError: `seq_ids` is not a batch.
            UnknownSequenceError: an element is not a live handle.
            InvalidArgumentError: an empty batch (D11) or a sequence twice.
        """
        seqs = [self._sequence(s) for s in checks.as_batch(seq_ids, "can_decode_step seq_ids")]
        if len({seq.id for seq in seqs}) != len(seqs) or not seqs:
            raise errors.not_distinct("can_decode_step", len(seqs), len({s.id for s in seqs}))
        needed = sum(int(cow) + grow for cow, grow in self._decode_plans(seqs))
        return needed <= self.blocks_available()

    # ---- commit -----------------------------------------------------------------------------

    def commit(self, seq_id: int) -> int:
        """Publishes the sequence's full blocks into the prefix index (rules 2, 4; D9).

        Requires:
            A live handle whose full blocks hold their K/V in every layer (the caller's part of rule
            2).

        Effects:
            One tick, even when nothing is new. Each missing node on the walk from the namespace
            root is inserted with the sequence's block (`last_used = now`); at an existing node with
            another block the sequence keeps its own (rule 4; duplicates + 1 the first time).
            Refcounts do not change: the index holds no reference.

        Returns:
            How many blocks were newly published.

        Raises:
            UnknownSequenceError: `seq_id` is not a live handle.
        """
        seq = self._sequence(seq_id)
        now = self._tick()
        size, parent, published = self.config.block_size, None, 0
        for i in range(len(seq.tokens) // size):
            key = tuple(seq.tokens[i * size : (i + 1) * size])
            child = self.index.children_of(seq.namespace, parent).get(key)
            if child is None:
                if seq.table[i] == HOLE:  # rule 10: a released block is never published
                    break
                child = self.index.insert(seq.namespace, parent, key, seq.table[i], now)
                published += 1
            elif child.block != seq.table[i] != HOLE and i >= seq.committed:
                self.counters.duplicates += 1
            parent = child
        seq.committed = len(seq.tokens) // size
        return published

    # ---- fork, trim, free ----------------------------------------------------------------------

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing every block of the parent, partial tail included (rule 9).

        Effects:
            One tick. Each held block of the parent gets refcount + 1; the child copies its tokens,
            table (holes included) and committed count and gets handle `next_sequence_id`. Stats:
            prefill_tokens_avoided + len(parent).

        Returns:
            The new handle.

        Raises:
            UnknownSequenceError: `seq_id` is not a live handle.
        """
        parent = self._sequence(seq_id)
        self._tick()
        for block in parent.table:
            if block != HOLE:
                self.pool.incref(block)
        child = Sequence(
            self.next_sequence_id,
            parent.namespace,
            list(parent.tokens),
            list(parent.table),
            parent.committed,
        )
        self.sequences[child.id] = child
        self.next_sequence_id += 1
        self.counters.prefill_tokens_avoided += len(parent.tokens)
        return child.id

    def trim(self, seq_id: int, num_tokens: int) -> None:
        """Drops the last `num_tokens` tokens (rule 8); trimming to 0 leaves an empty sequence.

        Requires:
            A live handle; `num_tokens` a count <= length; with a window, a new length whose last
            position's window is still held (D10).

        Effects:
            One tick (for 0 tokens too). Blocks past the new end are released, tail first (D4); the
            new tail block is kept as it is, so the next extend copies it if it is shared or
            indexed. The committed count shrinks to the remaining full blocks.

        Raises:
            UnknownSequenceError: `seq_id` is not a live handle.
            InvalidArgumentError: `num_tokens` is not a count.
            TrimError: more tokens than the sequence holds, or a trim that uncovers a hole (D10).
        """
        seq = self._sequence(seq_id)
        num_tokens = checks.as_count(num_tokens, "trim num_tokens")
        if num_tokens > len(seq.tokens):
            raise errors.trim_too_long(num_tokens, seq.id, len(seq.tokens))
        new_length = len(seq.tokens) - num_tokens
        cfg = self.config
        if trim_uncovers_hole(new_length, leading_holes(seq.table), cfg.window, cfg.block_size):
            most = len(seq.tokens) - leading_holes(seq.table) * cfg.block_size - cfg.window
            raise errors.trim_reaches_released(num_tokens, seq.id, cfg.window, most)
        now = self._tick()
        keep = blocks_for(new_length, self.config.block_size)
        for block in reversed(seq.table[keep:]):
            self._release(block, now)
        del seq.table[keep:]
        del seq.tokens[new_length:]
        seq.committed = min(seq.committed, new_length // self.config.block_size)

    def free(self, seq_id: int) -> None:
        """Ends a sequence and releases its blocks (D4). Free never publishes (rule 2).

        Effects:
            One tick. Held blocks are released tail first: indexed ones stay cached with `last_used
            = now`, others reaching refcount 0 join the free queue's tail. The handle is never
            reissued.

        Raises:
            UnknownSequenceError: `seq_id` is not a live handle.
        """
        seq = self._sequence(seq_id)
        now = self._tick()
        for block in reversed(seq.table):
            if block != HOLE:
                self._release(block, now)
        del self.sequences[seq.id]

    # ---- the prefix cache ----------------------------------------------------------------------

    def evict(self, num_blocks: int) -> list[int]:
        """Evicts up to `num_blocks` cached leaves, in the order of rule 6.

        Effects:
            One tick, even when nothing is evictable. Each victim leaves the index and joins the
            free queue's tail; a parent whose last child went is a leaf and may follow. Stats:
            evictions + n.

        Returns:
            The evicted block ids, in order.

        Raises:
            InvalidArgumentError: `num_blocks` is not a count.
        """
        num_blocks = checks.as_count(num_blocks, "evict num_blocks")
        self._tick()
        evicted: list[int] = []
        while len(evicted) < num_blocks:
            victim = self.index.lru_leaf(self.pool.refcounts)
            if victim is None:
                break
            self.index.remove_leaf(victim)
            self.pool.push_free(victim.block)
            evicted.append(victim.block)
        self.counters.evictions += len(evicted)
        return evicted

    def clear_cache(self) -> int:
        """Empties the prefix index (D5).

        Effects:
            One tick. Cached blocks join the free queue in ascending block id; indexed blocks in use
            stay with their sequences, no longer matchable. Stats: evictions + cached blocks.

        Returns:
            How many cached blocks were freed.
        """
        self._tick()
        cached = sorted(n.block for n in self.index.nodes() if self.pool.refcounts[n.block] == 0)
        self.index.clear()
        for block in cached:
            self.pool.push_free(block)
        self.counters.evictions += len(cached)
        return len(cached)

    # ---- observation ---------------------------------------------------------------------------

    def sequence_length(self, seq_id: int) -> int:
        """The sequence's number of positions. Raises UnknownSequenceError."""
        return len(self._sequence(seq_id).tokens)

    def tokens(self, seq_id: int) -> tuple[int, ...]:
        """The sequence's tokens. Raises UnknownSequenceError."""
        return tuple(self._sequence(seq_id).tokens)

    def block_table(self, seq_id: int) -> tuple[int, ...]:
        """The table: a block id per block_size positions, -1 for a hole (rule 10). Raises
        UnknownSequenceError.
        """
        return tuple(self._sequence(seq_id).table)

    def stats(self) -> Stats:
        """Block states and event counters (`pagedkv.types.Stats`)."""
        return observe.stats(self)

    def snapshot(self) -> Snapshot:
        """Every observable piece of metadata, as plain comparable data."""
        return observe.snapshot(self)

    def check_invariants(self) -> None:
        """Checks I1..I11 (`pagedkv.spec.rules`) and raises InvariantError naming the first that
        fails."""
        observe.check_invariants(self)
