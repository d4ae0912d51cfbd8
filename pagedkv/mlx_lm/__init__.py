"""mlx-lm adapter: per-layer cache objects over one shared paged store.

mlx-lm models call, per layer, `cache.offset` (for RoPE), `cache.update_and_fetch(keys, values)`
with post-RoPE `[B, kv_heads, L, head_dim]` (expecting the whole history back), and
`cache.make_mask(N, ...)` before the first layer. `PagedLayerCache` answers those from a
`pagedkv.mlx_backend.PagedCache` holding every request's blocks, so `mlx_lm.generate`,
`stream_generate` and `generate_step` run unchanged with `prompt_cache=session.caches`.

    store = PagedKVStore.for_model(model, num_blocks=1024)
    session = store.open(prompt_tokens)              # matches cached prefix blocks
    for out in stream_generate(model, tokenizer, session.remaining_prompt,
                               prompt_cache=session.caches, max_tokens=64):
        ...
    session.close()                                  # frees; committed prompt blocks stay cached

`PagedKVStore.for_model` lays the store out from the model itself (kinds.py, shapes.py): cache
kinds from `model.make_cache()` (full attention, sliding windows, layers sharing another layer's
K/V, recurrent state kept in mlx-lm's own objects), K/V shapes and dtype from one recorded forward
pass, one paged cache per attention span (windows release blocks before the window), and a clear
UnsupportedModelError for what it cannot run exactly. docs/mlx-lm.md lists every architecture.

The store learns a request's tokens from `open(prompt_tokens)`: prompt blocks are reserved there,
written as mlx-lm prefills, and committed to the prefix index once every layer has written the
whole prompt. Generated tokens are not seen by a cache (mlx-lm feeds the model, not the cache), so
positions past the prompt are reserved under `UNKNOWN_TOKEN` and never published.
"""

from pagedkv.mlx_lm.layer_cache import PagedLayerCache
from pagedkv.mlx_lm.session import UNKNOWN_TOKEN, Session
from pagedkv.mlx_lm.store import PagedKVStore
from pagedkv.mlx_lm.window import WindowLayerCache

__all__ = ["UNKNOWN_TOKEN", "PagedKVStore", "PagedLayerCache", "Session", "WindowLayerCache"]
