"""Edge cases the operation contracts decide (decision D11 and the Effects sections), both sides."""

from __future__ import annotations

import numpy as np
import pytest

from pagedkv import Config
from pagedkv.errors import (
    InvalidArgumentError,
    InvalidPositionError,
    InvalidTokensError,
    KVShapeError,
)
from tests.impls import IMPLS, cache_class, to_numpy


def queries(impl: str, shape: tuple[int, ...]):
    data = np.zeros(shape, np.float32)
    if impl == "spec":
        return data
    import mlx.core as mx

    return mx.array(data)


def kv_rows(impl: str, shape: tuple[int, ...]):
    return queries(impl, shape)  # float32, the pools' dtype in these tests


@pytest.mark.parametrize("impl", IMPLS)
def test_can_extend_by_zero_tokens_is_refused_like_extend_by_none(impl):
    """D11: extend takes at least one token, so can_extend(s, 0) has nothing to answer."""
    cache = cache_class(impl)(Config(num_blocks=4, block_size=2, store_kv=False))
    seq, _ = cache.add_sequence([1, 2, 3])
    before = cache.snapshot()
    with pytest.raises(InvalidArgumentError, match="num_tokens must be >= 1"):
        cache.can_extend(seq, 0)
    assert cache.snapshot() == before
    assert cache.can_extend(seq, 1) and cache.can_extend(np.int64(seq), 5)
    assert not cache.can_extend(seq, 6)  # 9 tokens: 5 blocks of a 4-block pool


@pytest.mark.parametrize("impl", IMPLS)
def test_metadata_batches_refuse_an_empty_batch(impl):
    """D11: decode_step / can_decode_step / write_kv_batch over no sequence change nothing."""
    cache = cache_class(impl)(Config(num_blocks=4, block_size=2, num_kv_heads=1, head_dim=2))
    cache.add_sequence([1, 2, 3])
    before = cache.snapshot()
    rows = kv_rows(impl, (0, 1, 1, 2))
    with pytest.raises(InvalidTokensError):  # tokens are checked first: none is no token sequence
        cache.decode_step([], [])
    for call in (
        lambda: cache.decode_step([], [5]),
        lambda: cache.can_decode_step([]),
        lambda: cache.write_kv_batch([], 0, [], rows, rows),
    ):
        with pytest.raises(InvalidArgumentError):
            call()
    assert cache.snapshot() == before


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_decode_over_an_empty_batch_is_empty(impl):
    """D11: a read of nothing is well defined: `[0, q_heads, head_dim]`, no tick."""
    cache = cache_class(impl)(Config(num_blocks=4, block_size=2, num_kv_heads=1, head_dim=2))
    before = cache.snapshot()
    out = cache.attention_decode(0, [], queries(impl, (0, 2, 2)))
    assert to_numpy(out).shape == (0, 2, 2)
    assert cache.snapshot() == before


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_prefill_needs_one_to_len_queries(impl):
    cache = cache_class(impl)(Config(num_blocks=4, block_size=2, num_kv_heads=1, head_dim=2))
    seq, _ = cache.add_sequence([1, 2, 3])
    with pytest.raises(KVShapeError):
        cache.attention_prefill(seq, 0, queries(impl, (0, 1, 2)))  # L = 0: not [L >= 1, ...]
    with pytest.raises(InvalidPositionError):
        cache.attention_prefill(seq, 0, queries(impl, (4, 1, 2)))  # L > len
    assert to_numpy(cache.attention_prefill(seq, 0, queries(impl, (3, 1, 2)))).shape == (3, 1, 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_questions_and_reads_never_tick(impl):
    """D1: blocks_available, prefix_match, the can_* questions and reads leave the clock alone."""
    cache = cache_class(impl)(Config(num_blocks=6, block_size=2, num_kv_heads=1, head_dim=2))
    seq, _ = cache.add_sequence([1, 2, 3, 4, 5])
    cache.commit(seq)
    before = cache.snapshot()
    assert cache.blocks_available() == 3  # blocks 3, 4, 5 free; 0 and 1 indexed but in use
    assert cache.blocks_available({0, 1}) == 3 and cache.blocks_available({99}) == 3
    assert cache.prefix_match([1, 2, 3, 4, 9]) == 4
    assert cache.can_add_sequence([1, 2, 3, 4, 9]) and cache.can_extend(seq, 1)
    assert cache.can_decode_step([seq])
    cache.sequence_length(seq), cache.tokens(seq), cache.block_table(seq), cache.stats()
    cache.gather(seq, 0)
    cache.attention_decode(0, [seq], queries(impl, (1, 1, 2)))
    cache.write_kv(seq, 0, 4, kv_rows(impl, (1, 1, 2)), kv_rows(impl, (1, 1, 2)))
    assert cache.snapshot() == before


@pytest.mark.parametrize("impl", IMPLS)
def test_changing_operations_tick_even_when_they_change_little(impl):
    """D1: commit with nothing new, trim by 0 and evict with nothing evictable each tick once."""
    cache = cache_class(impl)(Config(num_blocks=4, block_size=2, store_kv=False))
    seq, _ = cache.add_sequence([1, 2, 3])
    for call in (
        lambda: cache.commit(seq),
        lambda: cache.commit(seq),
        lambda: cache.trim(seq, 0),
        lambda: cache.evict(0),
        lambda: cache.evict(5),
        lambda: cache.clear_cache(),
    ):
        clock = cache.snapshot().clock
        call()
        assert cache.snapshot().clock == clock + 1
    cache.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_blocks_available_counts_what_eviction_could_reach(impl):
    """A cached chain is reclaimable leaf by leaf; pinning a block keeps it and its ancestors."""
    cache = cache_class(impl)(Config(num_blocks=6, block_size=2, store_kv=False))
    seq, _ = cache.add_sequence([1, 2, 3, 4, 5])  # blocks 0, 1, 2
    cache.commit(seq)  # 0 -> 1 indexed
    cache.free(seq)  # 0 and 1 cached, 2 free
    assert cache.blocks_available() == 6
    assert cache.blocks_available({1}) == 4  # 1 pinned, so 0 above it is not reachable
    assert cache.blocks_available({0}) == 5  # the leaf 1 can still go
