"""Rule 10, sliding windows, as readable examples on the spec and the backend.

Block size 4, window 6: the query at position q sees keys q-5..q. Once the first new query of an
extend sits at n, blocks whose last position is <= n - 6 are released and become holes (-1).
"""

import numpy as np
import pytest

from pagedkv import Config
from pagedkv.config import ceil_div
from pagedkv.errors import InvalidPositionError, NotWritableError, TrimError
from tests.impls import IMPLS, cache_class, kv, to_numpy

S, W = 4, 6


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def window_cache(impl, num_blocks=8):
    config = Config(num_blocks=num_blocks, block_size=S, num_kv_heads=1, head_dim=2, window=W)
    return cache_class(impl)(config)


def decode(cache, impl, seq, count):
    for _ in range(count):
        cache.extend(seq, [7])
        end = cache.sequence_length(seq) - 1
        cache.write_kv(seq, 0, end, kv(impl, 1, 1, 2, end), kv(impl, 1, 1, 2, -end))


def test_blocks_before_the_window_are_released_and_memory_stays_bounded(impl):
    cache = window_cache(impl)
    seq, _ = cache.add_sequence([1, 2, 3])  # positions 0..2 in block 0
    decode(cache, impl, seq, 8)  # 11 tokens: the last extend's first query sat at 10
    # 10 - 6 = 4: block 0 (positions 0..3) is dead; block 1 (4..7) holds position 5, still needed
    assert cache.block_table(seq)[:1] == (-1,)
    assert cache.stats().in_use_blocks == 2
    for _ in range(200):  # a long generation: in-use blocks never pass window / S + 1
        decode(cache, impl, seq, 1)
        assert cache.stats().in_use_blocks <= ceil_div(W, S) + 1
    cache.check_invariants()


def test_released_rows_read_as_zeros_and_are_never_written(impl):
    cache = window_cache(impl)
    seq, _ = cache.add_sequence([1, 2, 3, 4])
    cache.write_kv(seq, 0, 0, kv(impl, 4, 1, 2, 1.0), kv(impl, 4, 1, 2, 1.0))
    decode(cache, impl, seq, 8)
    keys, _ = cache.gather(seq, 0)
    assert np.all(to_numpy(keys)[:4] == 0) and np.all(to_numpy(keys)[4:] != 0)
    with pytest.raises(NotWritableError):
        cache.write_kv(seq, 0, 1, kv(impl, 1, 1, 2, 9.0), kv(impl, 1, 1, 2, 9.0))


def test_trim_never_uncovers_a_released_block(impl):
    cache = window_cache(impl)
    seq, _ = cache.add_sequence([1, 2, 3])
    decode(cache, impl, seq, 8)  # 11 tokens, block 0 released: positions >= 4 held
    before = cache.snapshot()
    with pytest.raises(TrimError, match=r"trim at most 1\."):  # back to 9: position 8 needs 3
        cache.trim(seq, 2)
    assert cache.snapshot() == before
    cache.trim(seq, 1)  # back to 10: position 9 needs 4..9, all held
    assert cache.sequence_length(seq) == 10


def test_attention_sees_only_the_window(impl):
    cache = window_cache(impl)
    seq, _ = cache.add_sequence([1] * 10)
    for pos in range(10):
        cache.write_kv(seq, 0, pos, kv(impl, 1, 1, 2, pos), kv(impl, 1, 1, 2, pos))

    def queries(count):
        array = np.ones((count, 1, 2), np.float32)
        if impl == "mlx":
            import mlx.core as mx

            return mx.array(array)
        return array

    out = to_numpy(cache.attention_decode(0, [seq], queries(1)))
    assert 4 <= out.min() and out.max() <= 9  # a mix of the values 4..9 only
    decode(cache, impl, seq, 4)  # 14 tokens, positions 0..7 released
    with pytest.raises(InvalidPositionError):  # 12 queries: the one at 2 needs released keys
        cache.attention_prefill(seq, 0, queries(12))
    cache.attention_prefill(seq, 0, queries(1))  # the query at 13 needs 8..13: held


def test_a_wider_decode_window_may_reach_the_first_held_key_but_not_a_hole(impl):
    """attention_decode's `window` may be wider than the cache's (a layer with a longer window)
    as long as every key it needs is held: with 14 tokens, positions 0..7 are released, so the
    query at 13 may look back 6 keys (the cache's window: from 8), not 7 (from 7, a hole)."""
    cache = window_cache(impl)
    seq, _ = cache.add_sequence([1] * 10)
    decode(cache, impl, seq, 4)  # 14 tokens, positions 0..7 released
    query = np.ones((1, 1, 2), np.float32)
    if impl == "mlx":
        import mlx.core as mx

        query = mx.array(query)
    assert to_numpy(cache.attention_decode(0, [seq], query, window=6)).shape == (1, 1, 2)
    with pytest.raises(InvalidPositionError, match="released"):
        cache.attention_decode(0, [seq], query, window=7)


def test_a_committed_block_the_window_released_stays_a_correct_prefix(impl):
    cache = window_cache(impl)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    seq, _ = cache.add_sequence(prompt)
    cache.commit(seq)  # blocks 0 and 1 indexed
    decode(cache, impl, seq, 4)  # the window releases block 0: cached, not free
    assert cache.block_table(seq)[0] == -1
    assert cache.stats().cached_blocks == 1
    other, cached = cache.add_sequence(prompt)
    assert cached == 8  # both full blocks served, block 0 from the cache


@pytest.mark.parametrize("releaser_first", [True, False])
def test_a_window_release_earlier_in_a_decode_step_leaves_a_shared_tail_exclusive(
    impl, releaser_first
):
    cache = window_cache(impl)
    a, _ = cache.add_sequence(list(range(1, 10)))  # 9 tokens in blocks 0, 1, 2 (not committed)
    b = cache.fork(a)
    cache.trim(b, 7)  # b: 2 tokens, its tail block 0 shared with a
    # a's query at 9 releases block 0 (9 - 6 + 1 = 4 = one block). Processed before b, that
    # leaves b its only holder, so b writes in place; processed after, b must copy it first.
    cache.decode_step([a, b] if releaser_first else [b, a], [5, 5])
    assert cache.block_table(a)[0] == -1
    assert (cache.block_table(b)[0] == 0) == releaser_first
    assert cache.stats().cow_copies == (0 if releaser_first else 1)
    cache.check_invariants()


def test_window_benchmark_curve_is_flat_past_the_window():
    pytest.importorskip("mlx.core")
    from pagedkv.benchmarks.window import window_curve
    from pagedkv.mlx_backend import PagedCache

    rows = window_curve(PagedCache, window=64, block_size=8, prompt=16, tokens=512, every=32)
    past = [r for r in rows if r[0] >= 64 + 8]
    assert past and all(window == past[0][1] <= bound for _, window, _, bound in past)
    assert rows[-1][2] == ceil_div(rows[-1][0], 8)  # full attention keeps every block


def test_a_prefill_query_needing_only_the_one_released_position_is_refused(impl):
    """The boundary of rule 10's check, at block size 1: with window 3 and the last extend's first
    query at 3, only position 0 is released. Two queries (at 2 and 3): the one at 2 needs keys
    0..2, so the call is refused and nothing changes; one query (at 3) needs 1..3, all held."""
    config = Config(num_blocks=8, block_size=1, num_kv_heads=1, head_dim=2, window=3)
    cache = cache_class(impl)(config)
    seq, _ = cache.add_sequence([1, 2, 3])
    cache.extend(seq, [4])
    assert cache.block_table(seq)[0] == -1 and -1 not in cache.block_table(seq)[1:]
    queries = np.ones((2, 1, 2), np.float32)
    if impl == "mlx":
        import mlx.core as mx

        queries = mx.array(queries)
    before = cache.snapshot()
    with pytest.raises(InvalidPositionError, match="released"):
        cache.attention_prefill(seq, 0, queries)
    assert cache.snapshot() == before
    assert to_numpy(cache.attention_prefill(seq, 0, queries[1:])).shape == (1, 1, 2)
