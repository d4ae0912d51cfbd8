"""Paged attention (MLX) against the spec's float32 reference and against dense SDPA on the same K/V.

Tolerances, max abs difference: float32 1e-5; float16 and bfloat16 (pool and queries in that
dtype, so K/V are rounded once on write) 2e-2 against the float32 reference of the stored values.
"""

import mlx.core as mx
import numpy as np
import pytest

from pagedkv import Config
from pagedkv.mlx_backend import PagedCache as MLXCache
from pagedkv.spec import PagedCache as SpecCache
from tests.property.model import mlx_native, spec_native

TOLERANCE = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 2e-2}
H, D, GROUP = 2, 16, 4  # GQA: 8 query heads over 2 K/V heads


def build(dtype: str, lengths: list[int], block_size: int = 4, seed: int = 0):
    """Both caches holding the same random K/V for sequences of the given lengths, fragmented."""
    config = Config(
        num_blocks=64, block_size=block_size, num_layers=1, num_kv_heads=H, head_dim=D, dtype=dtype
    )
    spec, paged = SpecCache(config), MLXCache(config)
    rng = np.random.default_rng(seed)
    spacer = [c.add_sequence([9] * 5)[0] for c in (spec, paged)]  # fragment the block tables
    seqs = []
    for i, length in enumerate(lengths):
        ids = [c.add_sequence([i] * length)[0] for c in (spec, paged)]
        keys = rng.standard_normal((length, H, D)).astype(np.float32)
        values = rng.standard_normal((length, H, D)).astype(np.float32)
        spec.write_kv(ids[0], 0, 0, spec_native(keys, dtype), spec_native(values, dtype))
        paged.write_kv(ids[1], 0, 0, mlx_native(keys, dtype), mlx_native(values, dtype))
        seqs.append(ids[0])
    for c, s in zip((spec, paged), spacer):
        c.free(s)
    return spec, paged, seqs


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
def test_decode_batched_ragged_matches_reference_and_dense(dtype):
    lengths = [1, 7, 33, 16]
    spec, paged, seqs = build(dtype, lengths)
    queries = np.random.default_rng(1).standard_normal((4, H * GROUP, D)).astype(np.float32)
    q_native = mx.array(queries).astype(getattr(mx, dtype))
    reference = spec.attention_decode(0, seqs, queries.astype(np.float32))
    got = np.array(paged.attention_decode(0, seqs, q_native).astype(mx.float32))
    tol = TOLERANCE[dtype]
    assert np.abs(got - reference).max() <= tol
    for b, seq in enumerate(seqs):  # dense SDPA over the contiguous K/V of one sequence
        keys, values = paged.gather(seq, 0)
        dense = mx.fast.scaled_dot_product_attention(
            q_native[b][None, :, None, :],
            keys.transpose(1, 0, 2)[None],
            values.transpose(1, 0, 2)[None],
            scale=D**-0.5,
        )
        assert np.abs(np.array(dense[0, :, 0].astype(mx.float32)) - got[b]).max() <= tol


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
@pytest.mark.parametrize("cached", [0, 8, 29])
def test_prefill_after_a_cached_prefix_matches_reference(dtype, cached):
    spec, paged, seqs = build(dtype, [30])
    count = 30 - cached
    queries = np.random.default_rng(2).standard_normal((count, H * GROUP, D)).astype(np.float32)
    reference = spec.attention_prefill(seqs[0], 0, queries)
    got = paged.attention_prefill(seqs[0], 0, mx.array(queries).astype(getattr(mx, dtype)))
    assert np.abs(np.array(got.astype(mx.float32)) - reference).max() <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
@pytest.mark.parametrize("window", [None, 1, 5, 20])
def test_decode_window_sinks_and_scale_match_reference(dtype, window):
    """Sliding windows, attention sinks and a non-default scale reach both sides alike, and each
    changes the output (so a side that ignored one would fail)."""
    lengths = [1, 7, 33, 16]
    spec, paged, seqs = build(dtype, lengths, seed=3)
    rng = np.random.default_rng(4)
    queries = rng.standard_normal((4, H * GROUP, D)).astype(np.float32)
    sinks = rng.standard_normal(H * GROUP).astype(np.float32)
    q_native = mx.array(queries).astype(getattr(mx, dtype))
    reference = spec.attention_decode(0, seqs, queries, 0.7, window, sinks)
    got = paged.attention_decode(0, seqs, q_native, 0.7, window, mx.array(sinks))
    assert np.abs(np.array(got.astype(mx.float32)) - reference).max() <= TOLERANCE[dtype]
    plain = spec.attention_decode(0, seqs, queries)
    assert np.abs(plain - reference).max() > 10 * TOLERANCE[dtype]  # the arguments matter
    assert np.abs(spec.attention_decode(0, seqs, queries, 0.7) - plain).max() > 1e-3
    unsunk = spec.attention_decode(0, seqs, queries, 0.7, window)
    assert np.abs(unsunk - reference).max() > 1e-3
    if window and window < 33:
        full = spec.attention_decode(0, seqs, queries, 0.7, None, sinks)
        assert np.abs(full[2] - reference[2]).max() > 1e-3  # row 2 (33 keys) sees fewer keys


@pytest.mark.parametrize("make_bad", [
    lambda q: dict(window=0), lambda q: dict(window=2.0), lambda q: dict(window=True),
    lambda q: dict(sinks="no"), lambda q: dict(sinks=np.zeros(3, np.float32)),
    lambda q: dict(sinks=np.full(q, np.nan, np.float32)),
])  # fmt: skip
def test_bad_window_or_sinks_raise_the_same_error_on_both_sides(make_bad):
    from pagedkv.errors import InvalidArgumentError

    spec, paged, seqs = build("float32", [5, 9])
    queries = np.zeros((2, H * GROUP, D), np.float32)
    bad = make_bad(H * GROUP)
    with pytest.raises(InvalidArgumentError):
        spec.attention_decode(0, seqs, queries, **bad)
    if isinstance(bad.get("sinks"), np.ndarray):
        bad["sinks"] = mx.array(bad["sinks"])
    with pytest.raises(InvalidArgumentError):
        paged.attention_decode(0, seqs, mx.array(queries), **bad)
