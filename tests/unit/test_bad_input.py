"""Every bad-input class of every operation: the right error, and nothing changed.

Each case runs on a cache holding committed, shared, cached and private blocks, and compares the
snapshot and every sequence's gathered K/V before and after.
"""

import numpy as np
import pytest

from pagedkv import Config
from pagedkv import errors as E
from tests.impls import IMPLS, cache_class, kv, to_numpy

H, D = 2, 4


def populated(impl):
    cache = cache_class(impl)(
        Config(num_blocks=6, block_size=4, num_layers=2, num_kv_heads=H, head_dim=D)
    )
    a, _ = cache.add_sequence(list(range(9)))  # 3 blocks
    for layer in range(2):
        rows = kv(impl, 9, H, D, 0.5)
        cache.write_kv(a, layer, 0, rows, rows)
    cache.commit(a)
    b = cache.fork(a)  # shares all three
    c, _ = cache.add_sequence([7, 7, 7, 7, 7])  # 2 private blocks
    cache.commit(c)
    cache.free(c)  # one cached block, one free
    return cache, a, b


def good_rows(impl, n=1):
    return kv(impl, n, H, D, 0.0)


def batch_rows(impl, batch):
    """[batch, 1, H, D] rows, native to the implementation."""
    rows = good_rows(impl)
    if impl == "spec":
        import numpy as np

        return np.stack([rows] * batch)
    import mlx.core as mx

    return mx.stack([rows] * batch)


CASES = {
    # add_sequence
    "add: no tokens": (lambda c, i, a, b: c.add_sequence([]), E.InvalidTokensError),
    "add: negative token": (lambda c, i, a, b: c.add_sequence([1, -3]), E.InvalidTokensError),
    "add: token too large": (lambda c, i, a, b: c.add_sequence([2**31]), E.InvalidTokensError),
    "add: float token": (lambda c, i, a, b: c.add_sequence([1.0]), E.InvalidTokensError),
    "add: bool token": (lambda c, i, a, b: c.add_sequence([True]), E.InvalidTokensError),
    "add: string": (lambda c, i, a, b: c.add_sequence("abc"), E.InvalidTokensError),
    "add: namespace type": (lambda c, i, a, b: c.add_sequence([1], 3), E.InvalidArgumentError),
    "add: out of blocks": (lambda c, i, a, b: c.add_sequence([3] * 13), E.OutOfBlocksError),
    # extend
    "extend: unknown": (lambda c, i, a, b: c.extend(99, [1]), E.UnknownSequenceError),
    "extend: freed": (lambda c, i, a, b: c.extend(2, [1]), E.UnknownSequenceError),
    "extend: no tokens": (lambda c, i, a, b: c.extend(a, []), E.InvalidTokensError),
    "extend: bad token": (lambda c, i, a, b: c.extend(a, [-1]), E.InvalidTokensError),
    "extend: out of blocks (cow + 3 blocks)": (
        lambda c, i, a, b: c.extend(a, [1] * 12),
        E.OutOfBlocksError,
    ),
    # decode_step
    "decode: twice": (lambda c, i, a, b: c.decode_step([a, a], [1, 2]), E.InvalidArgumentError),
    "decode: token count": (lambda c, i, a, b: c.decode_step([a, b], [1]), E.InvalidArgumentError),
    "decode: none": (lambda c, i, a, b: c.decode_step([], [1]), E.InvalidArgumentError),
    "decode: unknown": (lambda c, i, a, b: c.decode_step([a, 99], [1, 2]), E.UnknownSequenceError),
    "decode: bad token": (lambda c, i, a, b: c.decode_step([a], [-5]), E.InvalidTokensError),
    # write_kv
    "write: unknown": (
        lambda c, i, a, b: c.write_kv(99, 0, 0, *[good_rows(i)] * 2),
        E.UnknownSequenceError,
    ),
    "write: layer": (
        lambda c, i, a, b: c.write_kv(a, 2, 8, *[good_rows(i)] * 2),
        E.InvalidArgumentError,
    ),
    "write: negative start": (
        lambda c, i, a, b: c.write_kv(a, 0, -1, *[good_rows(i)] * 2),
        E.InvalidArgumentError,
    ),
    "write: past the end": (
        lambda c, i, a, b: c.write_kv(a, 0, 9, *[good_rows(i)] * 2),
        E.InvalidPositionError,
    ),
    "write: shape": (
        lambda c, i, a, b: c.write_kv(a, 0, 8, kv(i, 1, H, D + 1, 0), kv(i, 1, H, D + 1, 0)),
        E.KVShapeError,
    ),
    "write: zero rows": (
        lambda c, i, a, b: c.write_kv(a, 0, 8, kv(i, 0, H, D, 0), kv(i, 0, H, D, 0)),
        E.KVShapeError,
    ),
    "write: k/v differ": (
        lambda c, i, a, b: c.write_kv(a, 0, 7, good_rows(i, 2), good_rows(i, 1)),
        E.KVShapeError,
    ),
    "write: dtype": (
        lambda c, i, a, b: c.write_kv(a, 0, 8, *[kv(i, 1, H, D, 0, "float16")] * 2),
        E.KVDtypeError,
    ),
    "write: not an array": (
        lambda c, i, a, b: c.write_kv(a, 0, 8, [[0.0]], [[0.0]]),
        E.KVDtypeError,
    ),
    "write: shared block": (
        lambda c, i, a, b: c.write_kv(a, 0, 8, *[good_rows(i)] * 2),
        E.NotWritableError,
    ),
    # write_kv_batch
    "batch write: twice": (
        lambda c, i, a, b: c.write_kv_batch([a, a], 0, [8, 8], *[batch_rows(i, 2)] * 2),
        E.InvalidArgumentError,
    ),
    "batch write: starts": (
        lambda c, i, a, b: c.write_kv_batch([a, b], 0, [8], *[batch_rows(i, 2)] * 2),
        E.InvalidArgumentError,
    ),
    "batch write: not 4-d": (
        lambda c, i, a, b: c.write_kv_batch([a, b], 0, [8, 8], *[good_rows(i)] * 2),
        E.KVShapeError,
    ),
    "batch write: rows of another batch": (
        lambda c, i, a, b: c.write_kv_batch([a, b], 0, [8, 8], *[batch_rows(i, 3)] * 2),
        E.KVShapeError,
    ),
    "batch write: one shared": (
        lambda c, i, a, b: c.write_kv_batch([a, b], 0, [8, 8], *[batch_rows(i, 2)] * 2),
        E.NotWritableError,
    ),
    "batch write: past the end": (
        lambda c, i, a, b: c.write_kv_batch([a, b], 0, [9, 8], *[batch_rows(i, 2)] * 2),
        E.InvalidPositionError,
    ),
    # commit, fork, free
    "commit: unknown": (lambda c, i, a, b: c.commit(-1), E.UnknownSequenceError),
    "commit: not an int": (lambda c, i, a, b: c.commit("0"), E.UnknownSequenceError),
    "commit: float handle": (lambda c, i, a, b: c.commit(float(b)), E.UnknownSequenceError),
    "commit: bool handle": (lambda c, i, a, b: c.commit(True), E.UnknownSequenceError),
    "decode: float handle": (
        lambda c, i, a, b: c.decode_step([float(b)], [1]),
        E.UnknownSequenceError,
    ),
    "fork: unknown": (lambda c, i, a, b: c.fork(99), E.UnknownSequenceError),
    "free: unknown": (lambda c, i, a, b: c.free(99), E.UnknownSequenceError),
    "free: freed": (lambda c, i, a, b: c.free(2), E.UnknownSequenceError),
    # trim
    "trim: unknown": (lambda c, i, a, b: c.trim(99, 1), E.UnknownSequenceError),
    "trim: negative": (lambda c, i, a, b: c.trim(a, -1), E.InvalidArgumentError),
    "trim: past the start": (lambda c, i, a, b: c.trim(a, 10), E.TrimError),
    "trim: not an int": (lambda c, i, a, b: c.trim(a, 1.5), E.InvalidArgumentError),
    # evict
    "evict: negative": (lambda c, i, a, b: c.evict(-2), E.InvalidArgumentError),
    "evict: not an int": (lambda c, i, a, b: c.evict(None), E.InvalidArgumentError),
    # reads
    "gather: unknown": (lambda c, i, a, b: c.gather(99, 0), E.UnknownSequenceError),
    "gather: layer": (lambda c, i, a, b: c.gather(a, -1), E.InvalidArgumentError),
    "can_extend: unknown": (lambda c, i, a, b: c.can_extend(99, 1), E.UnknownSequenceError),
    "can_add: bad token": (lambda c, i, a, b: c.can_add_sequence([-1]), E.InvalidTokensError),
}


def queries(impl, batch, heads=4, dim=D):
    data = np.ones((batch, heads, dim), np.float32)
    if impl == "spec":
        return data
    import mlx.core as mx

    return mx.array(data)


CASES |= {
    "attention decode: unknown": (
        lambda c, i, a, b: c.attention_decode(0, [a, 99], queries(i, 2)),
        E.UnknownSequenceError,
    ),
    "attention decode: batch mismatch": (
        lambda c, i, a, b: c.attention_decode(0, [a], queries(i, 2)),
        E.KVShapeError,
    ),
    "attention decode: heads not a multiple": (
        lambda c, i, a, b: c.attention_decode(0, [a], queries(i, 1, 3)),
        E.KVShapeError,
    ),
    "attention decode: layer": (
        lambda c, i, a, b: c.attention_decode(5, [a], queries(i, 1)),
        E.InvalidArgumentError,
    ),
    "attention decode: scale": (
        lambda c, i, a, b: c.attention_decode(0, [a], queries(i, 1), "x"),
        E.InvalidArgumentError,
    ),
    "prefill: too many queries": (
        lambda c, i, a, b: c.attention_prefill(a, 0, queries(i, 10)),
        E.InvalidPositionError,
    ),
    "prefill: head_dim": (
        lambda c, i, a, b: c.attention_prefill(a, 0, queries(i, 2, 4, D + 1)),
        E.KVShapeError,
    ),
}


def int_queries(impl, batch):
    """Integer queries: not a float array."""
    data = np.ones((batch, 4, D), np.int32)
    if impl == "spec":
        return data
    import mlx.core as mx

    return mx.array(data)


CASES |= {
    "attention decode: integer queries": (
        lambda c, i, a, b: c.attention_decode(0, [a], int_queries(i, 1)),
        E.KVDtypeError,
    ),
    "prefill: unknown": (
        lambda c, i, a, b: c.attention_prefill(99, 0, queries(i, 2)),
        E.UnknownSequenceError,
    ),
    "prefill: layer": (
        lambda c, i, a, b: c.attention_prefill(a, 7, queries(i, 2)),
        E.InvalidArgumentError,
    ),
    "prefill: integer queries": (
        lambda c, i, a, b: c.attention_prefill(a, 0, int_queries(i, 2)),
        E.KVDtypeError,
    ),
    "batch write: dtype": (
        lambda c, i, a, b: c.write_kv_batch([a, b], 0, [8, 8], *[half_rows(i, 2)] * 2),
        E.KVDtypeError,
    ),
    "can_extend: negative": (lambda c, i, a, b: c.can_extend(a, -1), E.InvalidArgumentError),
    "sequence_length: unknown": (lambda c, i, a, b: c.sequence_length(99), E.UnknownSequenceError),
    "tokens: unknown": (lambda c, i, a, b: c.tokens(99), E.UnknownSequenceError),
    "block_table: unknown": (lambda c, i, a, b: c.block_table(99), E.UnknownSequenceError),
}


def half_rows(impl, batch):
    """[batch, 1, H, D] rows in float16, the wrong dtype for this float32 cache."""
    rows = kv(impl, 1, H, D, 0.0, "float16")
    if impl == "spec":
        return np.stack([rows] * batch)
    import mlx.core as mx

    return mx.stack([rows] * batch)


def observe(cache, seqs):
    gathered = [
        to_numpy(x).tobytes() for s in seqs for layer in (0, 1) for x in cache.gather(s, layer)
    ]
    return cache.snapshot(), gathered


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_and_changes_nothing(impl, case):
    cache, a, b = populated(impl)
    call, expected = CASES[case]
    before = observe(cache, [a, b])
    with pytest.raises(expected) as info:
        call(cache, impl, a, b)
    assert isinstance(info.value, E.PagedKVError)
    assert str(info.value)  # every message says something
    assert observe(cache, [a, b]) == before
    cache.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_config(impl):
    for bad in (
        dict(num_blocks=0),
        dict(block_size=-1),
        dict(head_dim=2.0),
        dict(dtype="int8"),
        dict(store_kv=1),
    ):
        with pytest.raises(E.ConfigError):
            Config(**{"num_blocks": 4, "block_size": 4, **bad})
    with pytest.raises(E.ConfigError):
        cache_class(impl)({"num_blocks": 4})


@pytest.mark.parametrize("impl", IMPLS)
def test_storage_disabled_operations(impl):
    cache = cache_class(impl)(Config(num_blocks=4, block_size=4, store_kv=False))
    seq, _ = cache.add_sequence([1, 2])
    for call in (
        lambda: cache.gather(seq, 0),
        lambda: cache.write_kv(seq, 0, 0, *[kv(impl, 1, 1, 8, 0)] * 2),
        lambda: cache.attention_decode(0, [seq], queries(impl, 1, 1, 8)),
    ):
        before = cache.snapshot()
        with pytest.raises(E.StorageDisabledError):
            call()
        assert cache.snapshot() == before


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_step_out_of_blocks_changes_nothing(impl):
    cache = cache_class(impl)(Config(num_blocks=4, block_size=2, store_kv=False))
    a, _ = cache.add_sequence([1, 2])
    b, _ = cache.add_sequence([3, 4, 5])  # one block full, one with a free row
    c, _ = cache.add_sequence([6])  # nothing left
    before = cache.snapshot()
    with pytest.raises(E.OutOfBlocksError):
        cache.decode_step([b, a], [7, 8])  # b fits in its tail, a needs a block: none
    assert cache.snapshot() == before
    cache.decode_step([b, c], [7, 8])  # both fit in their tails
    assert cache.sequence_length(b) == 4 and cache.sequence_length(c) == 2


@pytest.mark.parametrize("impl", IMPLS)
def test_numpy_integer_handles_are_accepted(impl):
    cache, a, b = populated(impl)
    assert cache.sequence_length(np.int64(b)) == 9
    cache.decode_step([np.int32(b)], [4])
    assert cache.sequence_length(b) == 10


@pytest.mark.parametrize("impl", IMPLS)
def test_a_batch_may_be_a_one_dimensional_numpy_array_but_not_a_two_dimensional_one(impl):
    cache, a, b = populated(impl)
    cache.decode_step(np.array([b]), np.array([4]))
    assert cache.tokens(b)[-1] == 4
    before = cache.snapshot()
    with pytest.raises(E.InvalidArgumentError):
        cache.decode_step(np.array([[b]]), [5])
    assert cache.snapshot() == before
