"""Sliding-window memory: pool blocks in use while one request decodes far past its window.

Counts come from the MLX backend's metadata (store_kv=False). One request with a prompt decodes
token by token in two caches of the same shape: one with `Config.window` (rule 10 releases the
blocks before the window) and one without (full attention keeps every block). The window cache's
blocks in use stay at most ceil(window / block_size) + 1 however long the request runs.
"""

from __future__ import annotations

from pagedkv.config import Config, ceil_div

QUICK = dict(window=1024, block_size=16, prompt=256, tokens=8192, every=512)
FULL = dict(window=4096, block_size=16, prompt=1024, tokens=32768, every=1024)


def window_curve(
    cache_class, window: int, block_size: int, prompt: int, tokens: int, every: int
) -> list[tuple[int, int, int, int]]:
    """Rows (tokens in the sequence, window-cache blocks in use, full-cache blocks in use, bound)."""
    blocks = ceil_div(prompt + tokens, block_size) + 1
    caches = [
        cache_class(Config(num_blocks=blocks, block_size=block_size, store_kv=False, window=w))
        for w in (window, None)
    ]
    seqs = [cache.add_sequence([1] * prompt)[0] for cache in caches]
    bound = ceil_div(window, block_size) + 1
    rows = []
    for step in range(1, tokens + 1):
        for cache, seq in zip(caches, seqs):
            cache.decode_step([seq], [7])
        if step % every == 0:
            in_use = [cache.stats().in_use_blocks for cache in caches]
            rows.append((prompt + step, in_use[0], in_use[1], bound))
    return rows
