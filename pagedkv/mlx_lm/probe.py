"""Can this model decode a ragged batch exactly on paged caches? Asked once, by trying it.

Batched caches right-pad shorter sequences and report per-sequence offsets; a model that takes
positions from `cache.offset` decodes every row as if it were alone. A model that derives positions
from the key length instead (afm7's K/V-reuse layers use `keys.shape[2] - L`) would silently rotate
a shorter row's queries to the wrong place. No argument name tells the two apart, so the store
decodes two requests of different lengths alone and batched on a scratch pool and compares.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

PROMPTS = ([1, 2, 3], [4, 5, 6, 7, 8, 9])
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def ragged_batch_is_exact(store, model) -> bool:
    """True when one batched decode step matches each request decoded alone (store's layout)."""
    cfg = store.config
    blocks = 4 * len(PROMPTS) * (len(PROMPTS[-1]) // cfg.block_size + 2)
    configs = [replace(cache.config, num_blocks=blocks) for cache in store.groups]
    scratch = type(store)(configs, store.entries, store.layer_shapes, store._make_cache)
    scratch.prefix_sharing = False  # no prefix hits: both passes prefill everything
    try:
        return _compare(scratch, model) <= TOLERANCE[cfg.dtype]
    except Exception:  # e.g. a model that turns cache.offset into a Python int (gpt_bigcode)
        return False


def _compare(scratch, model) -> float:
    alone = []
    for prompt in PROMPTS:
        session = scratch.open(prompt)
        model(mx.array([prompt]), cache=session.caches)
        alone.append(model(mx.array([[10]]), cache=session.caches)[0, -1])
        session.close()
    sessions = [scratch.open(p) for p in PROMPTS]
    for session, prompt in zip(sessions, PROMPTS):
        model(mx.array([prompt]), cache=session.caches)
    out = model(mx.array([[10]] * len(PROMPTS)), cache=scratch.caches_for(sessions))
    batched = [out[row, -1] for row in range(len(PROMPTS))]
    return max(
        mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
        for a, b in zip(alone, batched)
    )
