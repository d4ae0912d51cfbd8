"""The executable spec of pagedkv: a paged KV cache in plain NumPy, written to be read.

Model. A fixed pool of `num_blocks` blocks, each holding `block_size` token positions of K and V in
every layer. A *sequence* (one request) owns a token list and a *block table*: position p lives in
block `table[p // block_size]` at row `p % block_size`. Blocks are shared between sequences by
reference counting: a *prefix index* (a radix trie of full, committed blocks) lets a new prompt reuse
the blocks of an earlier prompt with the same prefix, and `fork` shares a whole sequence. A shared
block is never written; the first write copies it (copy-on-write). When blocks run out, cached blocks
nobody references are evicted, least recently used leaves first.

Modules, in reading order:
- `rules`: the rules (1..10) with their reasons, the decisions that complete them (D1..D11) and
  the invariants `check_invariants` verifies (I1..I11). Everything else cites these numbers.
- `pool`: refcounts and the FIFO free queue (rule 5).
- `index`: the prefix trie, namespaces, LRU-leaf eviction (rules 3, 6).
- `sequence`: a sequence's state and the event counters.
- `window`: which blocks a sliding window releases (rule 10).
- `checks`: the input contract (D6).
- `storage`: the K/V arrays in layout A.
- `cache`: `PagedCache` and its metadata operations; each docstring is the operation's contract.
- `allocation`: how those operations move blocks: allocate, release, copy-on-write, plans.
- `kv`: the K/V operations of `PagedCache`: writes, gather, attention.
- `observe`: stats, the comparable snapshot, and `check_invariants`.
- `attention`, `split_k`: the float32 reference attention, and the same computed by splits.
- `threads`: every public operation holds the cache's lock (D7).

This package never imports MLX.
"""

from pagedkv.config import Config
from pagedkv.spec.cache import PagedCache

__all__ = ["Config", "PagedCache"]
