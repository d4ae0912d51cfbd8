"""PagedCache: sequences, block tables, and every public operation of the contract.

Read this module top to bottom. Each public method states what it needs, what it changes, what it
returns and what it raises. The rules it implements are numbered as in the design brief:

1. Writable iff exclusive: a block takes K/V writes only if its refcount is 1 and it is not indexed.
2. Reserve -> write -> commit: `add_sequence`/`extend` reserve blocks, `write_kv` fills them,
   `commit` publishes full blocks to the prefix index.
3. Prefix hits are full blocks and leave at least one prompt token to compute.
4. Duplicates are not merged: `commit` keeps a private block equal to an indexed one.
5. Deterministic allocation from a FIFO free queue; an evicted block is used at once.
6. Deterministic eviction of LRU cached leaves by a logical clock, ties by lowest block id.
7. All or nothing: every check happens before the first change.
8. Trim releases blocks past the new end, tail first, and keeps the new tail block as it is.
9. Fork shares every block of the parent, partial tail included.
10. Sliding windows (`Config.window`): `extend`/`decode_step` release the blocks wholly before the
    window of their first new query and leave holes in the table (`pagedkv.spec.window`).

Decisions the brief leaves open, fixed here (the MLX backend follows them exactly):

- The logical clock ticks once per successful metadata-changing operation (add_sequence, extend,
  decode_step, commit, fork, trim, free, evict, clear_cache). Reads and `write_kv` do not tick; failures do not.
- An operation that needs n fresh blocks fails with OutOfBlocksError unless n blocks are available
  when it starts: free blocks plus cached blocks that repeated leaf eviction could reach. Blocks the
  operation itself releases along the way do not count; blocks a prompt matches are pinned first.
- Copy-on-write happens in `extend`: when new tokens land in a partial tail block that is not
  writable, extend first copies the tail's visible rows, in every layer, into a fresh block. The COW
  block is allocated before the blocks for positions past the tail. `write_kv` never allocates: it
  raises NotWritableError for rows in a block the sequence does not own exclusively.
- A released block that is indexed gets `last_used = now`; one that reaches refcount 0 and is not
  indexed joins the free queue's tail. Freeing and trimming release the table tail first.
- `clear_cache` drops every index node: cached blocks join the free queue in ascending block id
  (counted as evictions); indexed blocks still in use simply stop being matchable.
- Inputs follow one contract, stated in `pagedkv/spec/checks.py`: what an integer, a token
  sequence, a handle, a batch, a count are, and the order in which a call's arguments are checked.
  Handles are integers issued from 0 upwards; floats and bools name no sequence, so `1.0` or
  `True` raise UnknownSequenceError.
- Every cache is safe to call from several threads: each public operation holds the cache's
  lock, so calls are serialised (one at a time, each all or nothing).
- `decode_step` and `write_kv_batch` act exactly as in-order loops of `extend` / `write_kv`, but
  as one operation: one tick, and every check of the whole batch before its first change.
- `commit` walks the sequence's full blocks from the root and publishes every missing node, also
  ones below an earlier commit whose index nodes were since evicted. A duplicate is counted once,
  the first time the block is committed. The walk goes on through existing nodes, holes
  included, and stops at the first missing node whose block the window released (rule 10).
- Rule 10's releases happen after the operation's checks, before its copy-on-write and
  allocations (per sequence, in batch order for `decode_step`), like `free` releases: released
  blocks do not count as available for the operation that releases them. `gather` returns zeros
  for released positions; attention refuses queries whose window reaches one; `write_kv` into one
  raises NotWritableError; trim refuses to uncover one (TrimError).
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

from pagedkv import errors
from pagedkv.config import Config
from pagedkv.spec import checks, observe
from pagedkv.spec.index import PrefixIndex
from pagedkv.spec.kv import KVOperations
from pagedkv.spec.pool import BlockPool, blocks_for
from pagedkv.spec.storage import KVStorage
from pagedkv.spec.threads import serialised
from pagedkv.spec.window import HOLE, blocks_before_window, leading_holes, trim_uncovers_hole
from pagedkv.types import Counters, Snapshot, Stats


@dataclass
class Sequence:
    """A handle's state: its tokens and the block holding each run of `block_size` positions."""

    id: int
    namespace: str
    tokens: list[int]
    table: list[int]  # position p lives in block table[p // block_size], row p % block_size;
    # HOLE (-1) for a block released by the window (rule 10)
    committed: int  # leading full blocks already committed (for counting duplicates once)


@serialised  # every public method holds self._lock: calls from several threads run one at a time
class PagedCache(KVOperations):
    """The executable spec of a paged KV cache."""

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
        """Advances the logical clock; called once a changing operation has passed its checks."""
        self.clock += 1
        return self.clock

    def _is_writable(self, block: int) -> bool:
        """Rule 1."""
        return self.pool.refcounts[block] == 1 and block not in self.index.node_of_block

    def blocks_available(self, pinned: set[int] | None = None) -> int:
        """Free blocks plus cached blocks eviction could reach, not counting `pinned` ones."""
        return self.pool.num_free() + self.index.reclaimable(self.pool.refcounts, pinned or set())

    def _require_blocks(self, needed: int, pinned: set[int], asked: str) -> None:
        available = self.blocks_available(pinned)
        if needed > available:
            raise errors.out_of_blocks(asked, needed, available, self.config.num_blocks)

    def _allocate(self) -> int:
        """Rule 5: pop the free queue's head; when it is empty, evict (rule 6) and use that block.
        Precondition: a block is available (checked by _require_blocks). Returns it at refcount 1."""
        if self.pool.num_free():
            block = self.pool.pop_free()
        else:
            victim = self.index.lru_leaf(self.pool.refcounts)
            assert victim is not None, "caller checked availability"
            self.index.remove_leaf(victim)
            self.counters.evictions += 1
            block = victim.block
        self.pool.incref(block)
        return block

    def _release(self, block: int, now: int) -> None:
        """Drops one reference. An indexed block stays cached (and is touched); an unindexed block
        that nobody references any more joins the free queue's tail."""
        refcount = self.pool.decref(block)
        node = self.index.node_of_block.get(block)
        if node is not None:
            node.last_used = now
        elif refcount == 0:
            self.pool.push_free(block)

    def _window_releases(self, seq: Sequence) -> list[int]:
        """Rule 10: the held blocks wholly before the window of the next query (at len)."""
        dead = blocks_before_window(len(seq.tokens), self.config.window, self.config.block_size)
        return [block for block in seq.table[:dead] if block != HOLE]

    def _release_before_window(self, seq: Sequence, now: int) -> None:
        """Rule 10: releases those blocks, front to back, leaving holes in the table."""
        dead = blocks_before_window(len(seq.tokens), self.config.window, self.config.block_size)
        for i in range(dead):
            if seq.table[i] != HOLE:
                self._release(seq.table[i], now)
                seq.table[i] = HOLE

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
        """How many prompt tokens add_sequence would serve from the prefix index (rule 3), a
        multiple of block_size. Changes nothing. Raises InvalidTokensError, InvalidArgumentError."""
        _, _, chain = self._chain(tokens, namespace, None, "prefix_match")
        return len(chain) * self.config.block_size

    def can_add_sequence(
        self, tokens: SequenceOf[int], namespace: str = "", max_cached: int | None = None
    ) -> bool:
        """Whether add_sequence(tokens, namespace, max_cached) would find enough blocks. Changes
        nothing."""
        tokens, _, chain = self._chain(tokens, namespace, max_cached, "can_add_sequence")
        needed = blocks_for(len(tokens), self.config.block_size) - len(chain)
        return needed <= self.blocks_available({node.block for node in chain})

    def add_sequence(
        self, tokens: SequenceOf[int], namespace: str = "", max_cached: int | None = None
    ) -> tuple[int, int]:
        """Starts a sequence for a prompt. Rule 3: the longest indexed chain of full blocks matching
        the prompt (in `namespace`, capped to leave one token, and to `max_cached` tokens when
        given) is shared; blocks for the rest are allocated (rule 5). The caller then writes K/V
        for positions [cached, len) and commits. (`max_cached` lets several caches that hold one
        request's layers agree on one hit: each shares the shortest of their matches.)

        Returns (sequence id, cached tokens). Raises InvalidTokensError, InvalidArgumentError
        (namespace not a str, max_cached not an int >= 0), OutOfBlocksError.
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

    def _extend_plan(self, seq: Sequence, num_new: int) -> tuple[bool, int]:
        """(does the tail need copy-on-write, how many blocks past the tail) for num_new tokens."""
        size = self.config.block_size
        tail_rows = len(seq.tokens) % size
        cow = tail_rows != 0 and not self._is_writable(seq.table[-1])
        grow = blocks_for(len(seq.tokens) + num_new, size) - len(seq.table)
        return cow, grow

    def can_extend(self, seq_id: int, num_tokens: int) -> bool:
        """Whether extend(seq_id, <num_tokens tokens>) would find enough blocks. Changes nothing."""
        seq = self._sequence(seq_id)
        cow, grow = self._extend_plan(seq, max(1, checks.as_count(num_tokens, "num_tokens")))
        return int(cow) + grow <= self.blocks_available()

    def extend(self, seq_id: int, tokens: SequenceOf[int]) -> None:
        """Appends k >= 1 tokens (a decode step, a prefill chunk, speculative drafts) and reserves
        their positions. If they start inside a tail block that is not writable (shared after fork,
        or indexed after trim), the tail is first copied (rule 1): a fresh block receives its visible
        rows in every layer and replaces it in the table. Blocks past the tail are then allocated.

        Raises UnknownSequenceError, InvalidTokensError, OutOfBlocksError.
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
        """Extends each sequence of a batch by its one token, as a single operation: one clock
        tick, all or nothing. Sequences are extended in the order given, exactly as a loop of
        `extend` would (copy-on-write and allocation included: a fork whose shared tail its parent
        copied earlier in the batch has an exclusive tail and is not copied again). The batch
        fails unless the blocks all of it needs are available when it starts.

        Raises InvalidArgumentError (no sequences, a sequence twice, or not one token per
        sequence), UnknownSequenceError, InvalidTokensError, OutOfBlocksError.
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
        """Whether decode_step(seq_ids, <one token each>) would find enough blocks. Changes
        nothing. Raises UnknownSequenceError, InvalidArgumentError (none, or a sequence twice)."""
        seqs = [self._sequence(s) for s in checks.as_batch(seq_ids, "can_decode_step seq_ids")]
        if len({seq.id for seq in seqs}) != len(seqs) or not seqs:
            raise errors.not_distinct("can_decode_step", len(seqs), len({s.id for s in seqs}))
        needed = sum(int(cow) + grow for cow, grow in self._decode_plans(seqs))
        return needed <= self.blocks_available()

    def _decode_plans(self, seqs: list[Sequence]) -> list[tuple[bool, int]]:
        """(copy the tail, blocks past it) per sequence of a decode step.

        Plans in batch order, as a loop of extends would see it: copying one sequence's shared
        tail, or releasing blocks before its window, drops references, which can leave a later
        sequence's tail exclusive (no copy)."""
        dropped: dict[int, int] = {}
        plans = []
        for seq in seqs:
            for block in self._window_releases(seq):
                dropped[block] = dropped.get(block, 0) + 1
            cow, grow = self._extend_plan(seq, 1)
            if cow and self.pool.refcounts[seq.table[-1]] - dropped.get(seq.table[-1], 0) == 1:
                cow = seq.table[-1] in self.index.node_of_block  # exclusive now, unless indexed
            if cow:
                dropped[seq.table[-1]] = dropped.get(seq.table[-1], 0) + 1
            plans.append((cow, grow))
        return plans

    def _copy_on_write_tail(self, seq: Sequence, now: int) -> None:
        old = seq.table[-1]
        new = self._allocate()
        if self.storage is not None:
            self.storage.copy_rows(old, new, len(seq.tokens) % self.config.block_size)
        seq.table[-1] = new
        self._release(old, now)
        self.counters.cow_copies += 1

    # ---- commit -----------------------------------------------------------------------------

    def commit(self, seq_id: int) -> int:
        """Publishes the sequence's full blocks into the prefix index (rule 2). Walks its full
        blocks from the namespace root; a missing node is created for the sequence's block. An
        existing node with another block is a duplicate (rule 4): the sequence keeps its private
        block, later blocks go under the existing path, and `duplicates` counts it once.

        Returns how many blocks were newly published. Raises UnknownSequenceError.
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
        """Rule 9: a new sequence sharing every block of the parent, partial tail included. The
        first write past the shared tail copies it. Returns the new id. Raises UnknownSequenceError.
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
        """Rule 8: drops the last `num_tokens` tokens. Blocks past the new end are released, tail
        first; the new tail block is kept as it is, so if it is shared or indexed the next extend
        copies it. Trimming to 0 tokens leaves an empty sequence that extend can refill.

        Raises UnknownSequenceError, InvalidArgumentError (not an int >= 0), TrimError (more than
        the sequence holds).
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
        """Ends a sequence and releases its blocks, tail first. Committed blocks stay cached.
        Free never publishes. Raises UnknownSequenceError."""
        seq = self._sequence(seq_id)
        now = self._tick()
        for block in reversed(seq.table):
            if block != HOLE:
                self._release(block, now)
        del self.sequences[seq.id]

    # ---- the prefix cache ----------------------------------------------------------------------

    def evict(self, num_blocks: int) -> list[int]:
        """Evicts up to `num_blocks` cached leaves in rule-6 order; each joins the free queue's tail.
        Returns the evicted block ids in order. Raises InvalidArgumentError."""
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
        """Empties the prefix index. Cached blocks join the free queue in ascending id; indexed
        blocks still in use stay with their sequences but can no longer be matched.
        Returns how many cached blocks were freed."""
        self._tick()
        cached = sorted(n.block for n in self.index.nodes() if self.pool.refcounts[n.block] == 0)
        self.index.clear()
        for block in cached:
            self.pool.push_free(block)
        self.counters.evictions += len(cached)
        return len(cached)

    # ---- observation ---------------------------------------------------------------------------

    def sequence_length(self, seq_id: int) -> int:
        return len(self._sequence(seq_id).tokens)

    def tokens(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self._sequence(seq_id).tokens)

    def block_table(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self._sequence(seq_id).table)

    def stats(self) -> Stats:
        """Block states and event counters (see `pagedkv.types.Stats`)."""
        return observe.stats(self)

    def snapshot(self) -> Snapshot:
        """Every observable piece of metadata, as plain comparable data."""
        return observe.snapshot(self)

    def check_invariants(self) -> None:
        """Raises InvariantError naming the first broken invariant of the design brief."""
        observe.check_invariants(self)
