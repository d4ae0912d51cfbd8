"""The executable spec of pagedkv: a paged KV cache in plain NumPy, written to be read.

Model. A fixed pool of `num_blocks` blocks, each holding `block_size` token positions of K and V in
every layer. A *sequence* (one request) owns a token list and a *block table*: position p lives in
block `table[p // block_size]` at row `p % block_size`. Blocks are shared between sequences by
reference counting: a *prefix index* (a radix trie of full, committed blocks) lets a new prompt reuse
the blocks of an earlier prompt with the same prefix, and `fork` shares a whole sequence. A shared
block is never written; the first write copies it (copy-on-write). When blocks run out, cached blocks
nobody references are evicted, least recently used leaves first.

Modules, in reading order:
- `pool`: refcounts and the FIFO free queue (rule 5).
- `index`: the prefix trie, namespaces, LRU-leaf eviction (rules 3, 6).
- `storage`: the K/V arrays in layout A.
- `cache`: `PagedCache`, every public operation and the rules they follow.
- `observe`: stats, the comparable snapshot, and `check_invariants`.
- `attention`: the float32 reference attention.

This package never imports MLX.
"""

from pagedkv.config import Config
from pagedkv.spec.cache import PagedCache

__all__ = ["Config", "PagedCache"]
