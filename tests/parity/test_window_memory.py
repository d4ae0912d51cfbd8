"""A sliding-window model on pagedkv: the window layers' pool stays flat past the window.

gemma3-style tiny model (tests/parity/zoo.py): sliding layers with an 8-position RotatingKVCache
and full-attention layers. The store gives each kind its own cache; the window cache releases the
blocks before the window (rule 10) as the request decodes, while generation matches mlx-lm.
"""

import mlx.core as mx
from mlx_lm.generate import generate_step

from pagedkv import Config
from pagedkv.config import ceil_div
from pagedkv.mlx_lm import PagedKVStore
from pagedkv.mlx_lm.batch import BatchLayerCache, BatchWindowCache, RequestPool
from tests.parity.models import greedy
from tests.parity.zoo import build

BLOCK = 4


def test_window_layers_keep_window_plus_one_block_while_full_layers_grow():
    model = build("gemma3_text")
    store = PagedKVStore.for_model(model, num_blocks=64, block_size=BLOCK)
    full, window = store.groups
    assert (full.config.window, window.config.window) == (None, 8)
    prompt = list(range(3, 15))
    session = store.open(prompt)
    in_use = []
    paged = []
    for token, _ in generate_step(
        mx.array(prompt), model, max_tokens=48, sampler=greedy, prompt_cache=session.caches
    ):
        paged.append(token)
        in_use.append((full.stats().in_use_blocks, window.stats().in_use_blocks))
    dense = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=48, sampler=greedy)]
    assert paged == dense
    bound = ceil_div(8, BLOCK) + 1
    assert all(w <= bound for _, w in in_use[4:])  # past the prompt's first decode steps
    assert in_use[-1][0] == ceil_div(len(prompt) + 47, BLOCK)  # full attention: every block
    store.check_invariants()


def test_a_store_made_from_a_windowed_config_pages_window_layers():
    """`PagedKVStore(config)` with `config.window`: every layer is a sliding-window layer, so
    mlx-lm's batch protocol gets window caches (which mask by the window) for it."""
    shape = dict(num_blocks=16, block_size=4, num_layers=2, num_kv_heads=1, head_dim=4)
    for window, kind in ((None, BatchLayerCache), (6, BatchWindowCache)):
        store = PagedKVStore(Config(**shape, window=window))
        assert [e.kind for e in store.entries] == ["full" if window is None else "window"] * 2
        pool = RequestPool(store)
        request = pool.open([1, 2, 3])
        caches = pool.caches([request])
        assert [type(c) for c in caches] == [kind, kind]
