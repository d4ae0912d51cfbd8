"""Behaviours a mutation run showed the other tests did not pin down (issue 12), as scenarios on
both sides: `can_x` agrees with `x` in the corner cases, eviction order under reuse, a non-default
attention scale, and adapter batches that must not see each other's blocks."""

import numpy as np
import pytest

from pagedkv import Config
from pagedkv.errors import OutOfBlocksError
from tests.impls import HAVE_MLX, IMPLS, cache_class, to_numpy


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def metadata_cache(impl, num_blocks, block_size=2):
    return cache_class(impl)(Config(num_blocks=num_blocks, block_size=block_size, store_kv=False))


# ---- can_add_sequence / can_extend say exactly what add_sequence / extend will do --------------


def test_matched_cached_blocks_are_not_counted_as_reclaimable_for_their_own_prompt(impl):
    cache = metadata_cache(impl, 4)
    old, _ = cache.add_sequence([1, 1, 2, 2, 3])
    cache.commit(old)
    cache.free(old)  # blocks 0, 1 cached; 2 free; 3 free
    fits = [1, 1, 2, 2, 5, 5, 6]  # matches 2 blocks, needs 2 more: the 2 free ones
    assert cache.can_add_sequence(fits)
    too_long = [1, 1, 2, 2, 5, 5, 6, 6, 7]  # needs 3 more; its own matches are not reclaimable
    assert not cache.can_add_sequence(too_long)
    before = cache.snapshot()
    with pytest.raises(OutOfBlocksError):
        cache.add_sequence(too_long)
    assert cache.snapshot() == before
    cache.add_sequence(fits)
    cache.check_invariants()


def test_can_extend_counts_the_copy_of_a_shared_tail(impl):
    cache = metadata_cache(impl, 3)
    parent, _ = cache.add_sequence([1, 2, 3])  # blocks 0, 1 (a one-row tail); block 2 free
    child = cache.fork(parent)
    assert cache.can_extend(child, 1)  # one copy, one free block
    cache.extend(child, [4])
    assert cache.can_extend(parent, 1)  # its tail is exclusive again: no block needed
    grandchild = cache.fork(parent)  # shares the tail again, and no block is free
    assert not cache.can_extend(grandchild, 1)
    before = cache.snapshot()
    with pytest.raises(OutOfBlocksError):
        cache.extend(grandchild, [5])
    assert cache.snapshot() == before
    cache.free(child)  # frees block 2
    assert cache.can_extend(grandchild, 1)
    cache.extend(grandchild, [5])
    assert cache.stats().cow_copies == 2


# ---- eviction order under reuse ---------------------------------------------------------------


def test_a_reused_block_moves_to_the_back_and_a_matched_block_is_never_a_victim(impl):
    cache = metadata_cache(impl, 6)
    for first in (1, 2, 3):  # three cached one-block prefixes, released in this order
        seq, _ = cache.add_sequence([first, first, 9])
        cache.commit(seq)
        cache.free(seq)
    cached = {e.path_tokens[0]: e.block for e in cache.snapshot().index}
    reuse, hit = cache.add_sequence([1, 1, 7])  # matched again, released again: now the newest
    assert hit == 2
    cache.free(reuse)
    live, hit = cache.add_sequence([3, 3, 5])  # a live request holds prefix 3
    assert hit == 2
    big, _ = cache.add_sequence([6] * 7)  # 4 blocks: 2 free, then evict 2, then 1; never 3
    assert cache.block_table(big)[2:] == (cached[2], cached[1])
    assert cache.block_table(live)[0] == cached[3]
    assert cache.stats().evictions == 2
    assert not cache.can_add_sequence([6] * 3)
    with pytest.raises(OutOfBlocksError):
        cache.add_sequence([6] * 3)
    cache.check_invariants()


# ---- attention with a non-default scale -------------------------------------------------------


def mlx_array(array):
    import mlx.core as mx

    return mx.array(array)


def reference(queries, keys, values, scale):
    """softmax(q k^T * scale) v per query head, GQA: head h reads K/V head h // group."""
    group = queries.shape[1] // keys.shape[1]
    out = np.zeros_like(queries)
    for b in range(queries.shape[0]):
        for h in range(queries.shape[1]):
            scores = keys[:, h // group] @ queries[b, h] * scale
            weights = np.exp(scores - scores.max())
            out[b, h] = (weights / weights.sum()) @ values[:, h // group]
    return out


def test_attention_scale_is_applied(impl):
    cache = cache_class(impl)(
        Config(num_blocks=8, block_size=4, num_layers=1, num_kv_heads=1, head_dim=4)
    )
    seq, _ = cache.add_sequence(list(range(6)))
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((6, 1, 4)).astype(np.float32)
    values = rng.standard_normal((6, 1, 4)).astype(np.float32)
    native = np.asarray if impl == "spec" else mlx_array
    cache.write_kv(seq, 0, 0, native(keys), native(values))
    queries = rng.standard_normal((1, 2, 4)).astype(np.float32)
    for scale in (None, 0.1, 2.5):
        want = reference(queries, keys, values, 0.5 if scale is None else scale)
        got = to_numpy(cache.attention_decode(0, [seq], native(queries), scale))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        got = to_numpy(cache.attention_prefill(seq, 0, native(queries), scale))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # the last position
    default = to_numpy(cache.attention_decode(0, [seq], native(queries)))
    assert not np.allclose(
        default, to_numpy(cache.attention_decode(0, [seq], native(queries), 2.5))
    )


# ---- adapter batches ---------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_MLX, reason="the mlx-lm adapter needs MLX")
def test_two_batches_of_one_size_never_see_each_others_blocks():
    import mlx.core as mx

    from pagedkv.mlx_lm import PagedKVStore

    store = PagedKVStore(Config(num_blocks=32, block_size=4, num_kv_heads=1, head_dim=2))
    sessions = []
    for i in range(4):  # four requests, prefilled with K = V = their own number
        session = store.open([10 * i + t for t in range(5 + i)])
        rows = mx.full((1, 1, 5 + i, 2), float(i + 1))
        session.caches[0].update_and_fetch(rows, rows)
        sessions.append(session)
    first, second = store.batch(sessions[:2]), store.batch(sessions[2:])
    for step in range(2):  # fetch both at the same clock, then decode one token each
        for batch, owners in ((first, (0, 1)), (second, (2, 3))):
            keys, _ = batch[0].state
            for row, owner in enumerate(owners):
                length = 5 + owner + step
                got = np.array(keys[row, 0, :length, 0])
                assert (got == owner + 1).all(), (step, owner, got)
        for batch, owners in ((first, (0, 1)), (second, (2, 3))):
            rows = mx.array(np.array(owners, np.float32).reshape(2, 1, 1, 1) + 1)
            rows = mx.broadcast_to(rows, (2, 1, 1, 2))
            batch[0].update_and_fetch(rows, rows)
    store.cache.check_invariants()


def test_remembered_write_plans_do_not_grow_with_the_steps_of_a_long_generation():
    """The backend remembers each write's plan until the clock ticks (every layer of a step writes
    the same rows); a server decoding for hours must not keep one plan per step it ever ran."""
    pytest.importorskip("mlx.core")
    import mlx.core as mx

    cache = cache_class("mlx")(
        Config(num_blocks=64, block_size=4, num_layers=2, num_kv_heads=1, head_dim=2)
    )
    a, _ = cache.add_sequence([1, 2, 3])
    b, _ = cache.add_sequence([4, 5])
    rows = mx.zeros((1, 1, 2))
    for batched in (False, True):  # each kind of write on its own: either clears the memo
        for _ in range(20):
            cache.decode_step([a, b], [6, 6])
            ends = [cache.sequence_length(s) - 1 for s in (a, b)]
            for layer in range(2):
                if batched:
                    both = mx.stack([rows] * 2)
                    cache.write_kv_batch([a, b], layer, ends, both, both)
                else:
                    for seq, end in zip((a, b), ends):
                        cache.write_kv(seq, layer, end, rows, rows)
        assert len(cache._plans) == (1 if batched else 2)  # this step's plans only
