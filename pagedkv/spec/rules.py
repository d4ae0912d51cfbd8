"""The rules of pagedkv, the decisions that complete them, and the invariants that check them.

This module is the one place where they are numbered. Code, errors, tests and docs cite them by
number: "rule 4", "decision D3", "invariant I6" (the backend adds B1..B5 for its own structures).
Both implementations obey every rule and decision exactly; `check_invariants()` on either side
verifies I1..I11 and names the first that fails. Each entry is stated as a rule and then the reason
it holds, so it can be judged and not just followed.

Vocabulary: a cache has `num_blocks` blocks of `block_size` (S) positions. A *sequence* owns tokens
and a *block table*; position p lives in block `table[p // S]`, row `p % S`. A block's *refcount* is
the number of table entries that hold it. The *prefix index* is a trie of full, committed blocks
keyed by their S tokens; it holds no reference. A block is **free** (refcount 0, not indexed, in the
free queue), **cached** (refcount 0, indexed) or **in use** (refcount >= 1, maybe also indexed).

## Rules

1. **Writable iff exclusive.** A block takes K/V writes only while its refcount is 1 and it is not
   indexed. Any other write to its positions goes through copy-on-write: a fresh block receives
   the rows still visible, in every layer, and replaces it in the table. *Why:* a shared block is
   read by another sequence and an indexed one by every later prompt that matches it; writing
   either would change K/V that someone else already relies on.
2. **Reserve -> write -> commit.** `add_sequence`, `extend` and `decode_step` reserve blocks
   (metadata only); the caller writes K/V for the new positions in every layer (`write_kv`);
   `commit` publishes the full blocks to the prefix index. `free` never publishes. *Why:* admission
   is decided before any compute is spent, a write can never run out of blocks, and nothing is
   matchable before its owner declares its K/V complete.
3. **Prefix hits are full blocks and leave one token.** `add_sequence` shares the longest indexed
   chain of full blocks matching the prompt in its namespace, capped so that at least one prompt
   token is left to compute. *Why:* only a full block is immutable (its owner appends to a partial
   one), and the model must run at least one token to produce the logits of the next.
4. **Duplicates are not merged.** When `commit` finds a node with equal tokens under the same
   parent, the sequence keeps its private block (counted once in `stats().duplicates`) and its
   later blocks publish under the existing path. *Why:* a table changes only through operations
   on its own sequence, so a table a reader holds (a kernel in flight, an engine's copy) never
   changes under it; the price is one redundant block until that sequence lets go.
5. **Deterministic allocation.** Free blocks wait in a FIFO queue that starts 0, 1, ..., N-1.
   Allocation pops the head; a block that becomes free joins the tail; when the queue is empty
   the allocation evicts (rule 6) and uses the evicted block at once. *Why:* which block an
   allocation returns is a pure function of the operation history, so two implementations (and
   two runs) can be compared block id for block id.
6. **Deterministic eviction.** Only cached *leaves* (no children, refcount 0) are evicted: least
   recently used first by a logical clock, ties by lowest block id; a parent becomes a leaf when
   its last child goes. *Why:* lookups walk from the root, so an inner node's children would be
   unreachable without it; a referenced block is in use; and a clock that ticks per operation,
   unlike wall time, makes the order reproducible.
7. **All or nothing.** Every operation checks everything before its first change; an operation
   that raises leaves the whole state (clock and counters included) as it was. *Why:* a caller can
   react to an error (preempt a request, shrink a batch) without repairing the cache, and a
   failed call is observable only by its exception.
8. **Trim keeps the new tail.** `trim` drops the last n tokens, releases the blocks past the new
   end, tail first, and keeps the new tail block as it is. *Why:* speculative decoding rejects
   drafts often, so trim must be cheap and must not touch what others read: the kept tail may be
   shared or indexed, so instead of changing it the next `extend` copies it (rule 1).
9. **Fork shares everything.** `fork` makes a sequence that shares every block of its parent,
   partial tail included. *Why:* parallel sampling and beam search then cost no copy; whichever
   sequence first writes past the shared tail copies it (rule 1), and only if still shared.
10. **Sliding windows release what no query can read.** With `Config.window = W` the query at
    position q sees keys q - W + 1 .. q. `extend` and `decode_step` release the blocks wholly
    before the window of their first new query and leave holes (-1) in the table. *Why:* positions
    only grow between trims, so no present or future query reads those blocks; a sequence then
    holds at most ceil(W / S) + 1 blocks however long it runs, and holes keep `table[p // S]`
    valid for every held position (`pagedkv.spec.window`).

## Decisions

The rules leave some choices open; these fix them, and the backend follows them exactly.

- **D1 The clock.** It ticks once per successful metadata-changing operation (`add_sequence`,
  `extend`, `decode_step`, `commit`, `fork`, `trim`, `free`, `evict`, `clear_cache`). Reads,
  `can_*` questions and K/V writes do not tick; failures do not (rule 7). *Why:* eviction order
  should follow how blocks are used by requests, not how often someone looks.
- **D2 Availability.** An operation that needs n fresh blocks fails with OutOfBlocksError unless n
  blocks are available when it starts: free blocks plus cached blocks repeated leaf eviction could
  reach (`blocks_available`). Blocks the operation itself releases on the way do not count, and a
  prompt's matched blocks are pinned first. *Why:* the answer is known before the first change
  (rule 7) and is the same question `can_add_sequence` / `can_extend` / `can_decode_step` answer.
- **D3 Copy-on-write happens in extend.** When new tokens land in a partial tail that is not
  writable, `extend` (and `decode_step`) copies the tail's visible rows in every layer into a fresh
  block, allocated before the blocks past the tail. `write_kv` never allocates: it raises
  NotWritableError for rows in a block the sequence does not own exclusively. *Why:* all
  allocation stays in the reserve step (rule 2), so every layer's write sees the same table.
- **D4 Release.** A released block that is indexed gets `last_used = now` and stays cached; one
  that reaches refcount 0 and is not indexed joins the free queue's tail. `free` and `trim`
  release the table's tail first. *Why:* a prompt's first blocks, shared most widely, are the last
  to become reusable; and the release order is fixed, as rule 5 needs.
- **D5 clear_cache.** Every index node is dropped: cached blocks join the free queue in ascending
  block id (counted as evictions); indexed blocks still in use stay with their sequences but can
  no longer be matched. *Why:* a fixed order keeps rule 5 deterministic.
- **D6 The input contract.** What an integer, a token sequence, a handle, a batch and a count are,
  and the order in which a call's arguments are checked, is stated in `pagedkv.spec.checks`.
  Handles are integers issued from 0 upwards; floats and bools name no sequence. *Why:* both sides
  must refuse the same inputs with the same error, before any change.
- **D7 Threads.** Each public operation holds the cache's lock, so calls from several threads run
  one at a time, each all or nothing (`pagedkv.spec.threads`). *Why:* the rules then hold exactly
  as for one thread, for the price of an uncontended lock per call.
- **D8 Batched operations.** `decode_step` and `write_kv_batch` act exactly as in-order loops of
  `extend` / `write_kv`, but as one operation: one tick, and every check of the whole batch before
  its first change. *Why:* an engine steps a batch as a unit and must not be left half-stepped.
- **D9 Commit walks from the root.** `commit` walks the sequence's full blocks from the namespace
  root and publishes every missing node, also below an earlier commit whose nodes were since
  evicted. A duplicate is counted once, the first time its block is committed. The walk goes on
  through existing nodes, holes included, and stops at the first missing node whose block the
  window released. *Why:* a commit then republishes what eviction took, and a hole is never
  published (rule 10).
- **D10 When the window releases.** Rule 10's releases happen after the operation's checks and
  before its copy-on-write and allocations (per sequence, in batch order for `decode_step`); they
  do not count as available for that operation (D2). `gather` returns zeros for released positions,
  attention refuses queries whose window reaches one (InvalidPositionError), `write_kv` into one
  raises NotWritableError, and `trim` refuses to uncover one (TrimError). *Why:* a released block
  may already belong to another sequence, so its rows are never read or written again.
- **D11 Edge cases of arguments.** `can_extend(s, 0)` raises InvalidArgumentError: `extend` takes at
  least one token, so there is no operation to ask about. The batched operations that change state,
  and the question about one (`decode_step`, `write_kv_batch`, `can_decode_step`), refuse an empty
  batch with InvalidArgumentError (`decode_step([], [])` meets InvalidTokensError first: tokens are
  checked before the relations between arguments, and no tokens are no token sequence).
  `attention_decode` over an empty batch is a read and returns an empty `[0, q_heads, head_dim]`
  result. *Why:* a step of nothing is a caller's bug more often than not, and `decode_step` would
  tick the clock (D1) for no change; a question mirrors its operation; a read of nothing is well
  defined.

## Invariants

`check_invariants()` verifies these, in this order, on both sides, and raises InvariantError with
the number of the first that fails. They hold after every operation, successful or not; a failure
is a bug, never a user error.

- **I1 Table length.** Every sequence's table has ceil(len / S) entries. *Why:* position p must have
  a table entry, and a spare entry would hold a block nobody can reach.
- **I2 Holes are a prefix.** Holes (-1) are leading table entries only. *Why:* the window releases
  front to back (rule 10).
- **I3 Holes lie before the window.** A sequence has no more holes than blocks wholly before the
  window of its next query (none without a window). *Why:* a query may read any block inside its
  window.
- **I4 Refcounts count table entries.** Each block's refcount equals the number of table entries
  holding it, holes excluded. *Why:* this is what refcount means; every sharing decision (rule 1)
  and every release (D4) depends on it.
- **I5 The free queue holds no block twice.** *Why:* two allocations would get the same block.
- **I6 Free means unreferenced and unindexed.** The free queue holds exactly the blocks with
  refcount 0 that are not indexed. *Why:* with I4 this makes every block exactly one of free,
  cached or in use, and no block leaks: once every sequence is freed and the cache cleared, all
  N blocks are free.
- **I7 Index nodes are distinct full blocks.** No two nodes hold the same block, and every node's
  key is S tokens. *Why:* only full blocks are matched (rule 3), and a block holds one prefix.
- **I8 The index is consistent.** Every node is registered under its block and found under its
  parent (or its namespace root) by its key, and nothing else is in the index. *Why:* lookups,
  eviction and release each reach nodes through a different path and must agree.
- **I9 Held indexed blocks hold their tokens.** A sequence that holds an indexed block at table
  entry i has the node's path tokens at its positions up to (i + 1) * S. *Why:* a prefix hit
  serves that block's K/V for exactly those tokens.
- **I10 No block is writable by two sequences.** *Why:* rule 1; with I4 it can only fail if the
  writability test itself is wrong, which is what it guards.
- **I11 Bookkeeping is bounded.** Sequence ids are below the next id to issue, no sequence has
  more committed blocks than full blocks, and no node was used after the current tick. *Why:*
  handles are never reused, a trim shrinks `committed` with the tokens, and the clock only grows.
"""

from __future__ import annotations

import re

_RULE = re.compile(r"^(\d+)\. \*\*(.+?)\*\*", re.M)
_LABELLED = re.compile(r"^- \*\*([DI]\d+) (.+?)\*\*", re.M)


def rules() -> dict[int, str]:
    """Rule number -> title, read from this module's docstring (the one place they are written)."""
    return {int(number): title.rstrip(".") for number, title in _RULE.findall(__doc__ or "")}


def decisions() -> dict[str, str]:
    """Decision label (D1, ...) -> title."""
    return {k: v.rstrip(".") for k, v in _LABELLED.findall(__doc__ or "") if k.startswith("D")}


def invariants() -> dict[str, str]:
    """Invariant label (I1, ...) -> title."""
    return {k: v.rstrip(".") for k, v in _LABELLED.findall(__doc__ or "") if k.startswith("I")}


BEGIN = "<!-- rules: generated from pagedkv/spec/rules.py by `python -m pagedkv.spec` -->"
END = "<!-- rules: end of the generated section -->"


def markdown() -> str:
    """The Rules, Decisions and Invariants sections of this module's docstring, as docs/spec.md
    carries them between BEGIN and END."""
    doc = __doc__ or ""
    return doc[doc.index("## Rules") :].strip() + "\n"


def regenerate(page: str) -> str:
    """`page` with its generated section replaced by `markdown()`."""
    head, rest = page.split(BEGIN + "\n", 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{markdown()}\n{END}{tail}"
