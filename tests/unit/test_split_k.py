"""The split-K decode algorithm (`pagedkv.spec.split_k`, what every kernel computes) equals the
spec's plain softmax attention: random ragged lengths, split counts, block sizes, GQA ratios, pool
dtypes (values rounded to the dtype, math in float32), sliding windows and sinks."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pagedkv.config import ceil_div
from pagedkv.spec.attention import reference_attention
from pagedkv.spec.split_k import split_blocks, split_k_decode

ROUND = {
    "float32": lambda a: a.astype(np.float32),
    "float16": lambda a: a.astype(np.float16).astype(np.float32),
    "bfloat16": lambda a: (a.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32),
}


@st.composite
def decode_cases(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 4, 8]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    lengths = draw(st.lists(st.integers(1, 70), min_size=1, max_size=4))
    window = draw(st.one_of(st.none(), st.integers(1, 40)))
    splits = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(sorted(ROUND)))
    sinks = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return block_size, kv_heads, group, head_dim, lengths, window, splits, dtype, sinks, seed


@given(decode_cases())
def test_split_k_equals_plain_softmax_attention(case):
    block_size, kv_heads, group, head_dim, lengths, window, splits, dtype, sinks, seed = case
    rng = np.random.default_rng(seed)
    width = max(ceil_div(n, block_size) for n in lengths)
    num_blocks = len(lengths) * width + 3
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_pool = ROUND[dtype](rng.standard_normal(shape))
    v_pool = ROUND[dtype](rng.standard_normal(shape))
    tables = rng.permutation(num_blocks)[: len(lengths) * width].reshape(len(lengths), width)
    firsts = [max(0, n - window) if window else 0 for n in lengths]
    bounds = np.array([firsts, lengths]).T
    queries = ROUND[dtype](rng.standard_normal((len(lengths), kv_heads * group, head_dim)))
    sink_logits = rng.standard_normal(kv_heads * group).astype(np.float32) if sinks else None
    scale = float(rng.uniform(0.05, 1.0))
    got = split_k_decode(queries, k_pool, v_pool, tables, bounds, scale, splits, sink_logits)
    for b, length in enumerate(lengths):
        positions = np.arange(length)
        blocks = tables[b][positions // block_size]
        keys, values = (
            k_pool[blocks, positions % block_size],
            v_pool[blocks, positions % block_size],
        )
        want = reference_attention(
            queries[b : b + 1], keys, values, np.array([length - 1]), scale, window, sink_logits
        )[0]
        np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=2e-5)


@given(st.integers(0, 50), st.integers(1, 60), st.integers(1, 9), st.integers(1, 9))
def test_splits_cover_the_visible_keys_once_in_whole_blocks(first, extra, block_size, splits):
    length = first + extra
    ranges = split_blocks(first, length, block_size, splits)
    assert len(ranges) == splits
    covered = [t for r in ranges for t in r]
    assert covered == list(range(first, length))  # in order, each key once
    for r in ranges[:-1]:  # every split but the last ends on a block boundary (or is empty)
        assert len(r) == 0 or r.stop == length or r.stop % block_size == 0
    # The kernels deal blocks the same way: runs of ceil(blocks / splits), so split s starts at
    # block first_block + s * per_split (cut at `first`) unless it is past the row.
    first_block, blocks = first // block_size, -(-length // block_size) - first // block_size
    per_split = -(-blocks // splits)
    for s, r in enumerate(ranges):
        begin_block = first_block + s * per_split
        if len(r):
            assert r.start == max(first, begin_block * block_size)
            assert r.stop == min(length, (begin_block + per_split) * block_size)
        else:  # only past the row's last block
            assert begin_block * block_size >= length


def test_an_empty_split_drops_out_of_the_merge():
    """Eight splits over a two-block row: six are empty and must not disturb the result."""
    rng = np.random.default_rng(0)
    k_pool, v_pool = rng.standard_normal((2, 2, 4, 1, 8)).astype(np.float32)
    queries = rng.standard_normal((1, 2, 8)).astype(np.float32)
    args = (queries, k_pool, v_pool, np.array([[0, 1]]), np.array([[0, 3]]), 0.5)
    np.testing.assert_allclose(split_k_decode(*args, 8), split_k_decode(*args, 1), rtol=1e-6)
