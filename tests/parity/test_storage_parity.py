"""The paged pool stores exactly the bytes a dense mlx-lm KVCache stores for the same writes."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from pagedkv import Config
from pagedkv.mlx_lm import PagedKVStore


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_pool_contents_equal_a_dense_cache_fed_the_same_writes(dtype):
    mx_dtype = getattr(mx, dtype)
    store = PagedKVStore(
        Config(num_blocks=32, block_size=8, num_layers=2, num_kv_heads=2, head_dim=16, dtype=dtype)
    )
    session = store.open(list(range(50)))
    dense = [KVCache() for _ in range(2)]
    mx.random.seed(3)
    for chunk in (17, 20, 13, 1, 1, 1):  # prefill chunks, then decode steps
        for layer in range(2):
            keys = mx.random.normal((1, 2, chunk, 16)).astype(mx_dtype)
            values = mx.random.normal((1, 2, chunk, 16)).astype(mx_dtype)
            got_k, got_v = session.caches[layer].update_and_fetch(keys, values)
            want_k, want_v = dense[layer].update_and_fetch(keys, values)
            for got, want in ((got_k, want_k), (got_v, want_v)):
                assert got.shape == want.shape
                assert np.array_equal(
                    np.array(got.view(mx.uint16 if dtype != "float32" else mx.uint32)),
                    np.array(want.view(mx.uint16 if dtype != "float32" else mx.uint32)),
                )
    for layer in range(2):  # and the pool itself, read back through the core API
        keys, _ = store.cache.gather(session.seq, layer)
        want = dense[layer].state[0][0].transpose(1, 0, 2)[: keys.shape[0]]
        assert mx.array_equal(keys, want).item()
