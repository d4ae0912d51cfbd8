"""Hostile input, drawn by Hypothesis from `tests/hostile.py`: every call breaks the input contract
somewhere, so the spec and the backend must both raise a pagedkv error of the same class, with the
same message (built once, in `pagedkv.errors`), and leave their state (metadata and stored K/V)
exactly as it was."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pagedkv import Config
from pagedkv import errors as E
from tests import hostile
from tests.impls import HAVE_MLX, cache_class
from tests.property.model import mlx_native, spec_native
from tests.unit.test_bad_input import observe, populated

IMPLS = ["spec", "mlx"] if HAVE_MLX else ["spec"]


def as_native(impl: str, args: tuple, config) -> tuple:
    if impl == "spec":
        return hostile.native(args, spec_native, lambda q: q, config)
    import mlx.core as mx

    return hostile.native(args, mlx_native, mx.array, config)


@cache
def shared(impl: str):
    """One populated cache per implementation; hostile calls never change it (checked)."""
    cache, a, b = populated(impl)
    return cache, [a, b], observe(cache, [a, b])


def outcome(impl: str, op: str, args: tuple) -> tuple[type, str]:
    cache, live, before = shared(impl)
    with pytest.raises(E.PagedKVError) as info:  # never a raw TypeError, never success
        getattr(cache, op)(*as_native(impl, args, cache.config))
    assert str(info.value)
    assert observe(cache, live) == before, f"{impl}.{op} raised yet changed state"
    return type(info.value), same_text(info.value)


def same_text(error: Exception) -> str:
    """The message, except where it names the side's own array type or dtype (KVDtypeError: a
    NumPy array or an mx.array), which the two sides cannot share."""
    return "" if isinstance(error, E.KVDtypeError) else str(error)


@settings(max_examples=300)
@given(data=st.data())
def test_hostile_calls_raise_the_same_error_on_both_sides(data):
    live = shared("spec")[1]
    op, args = data.draw(hostile.calls(live, num_layers=2), label="call")
    errors = {impl: outcome(impl, op, args) for impl in IMPLS}
    assert len(set(errors.values())) == 1, f"{op}{args!r}: {errors}"


def every_hostile_class(a: int, num_layers: int = 2) -> list[tuple[str, tuple]]:
    """Each listed hostile value of each argument kind, in each operation that takes that kind,
    with every other argument good: a table, so no class depends on what Hypothesis draws."""
    rows, rows_b, q = hostile.Rows(1), hostile.Rows(1, 1), hostile.Queries(1)
    bad_tokens = hostile.bad_token_containers() + [[1, v] for v in hostile.BAD_TOKEN_VALUE_LIST]
    cases = []
    for t in bad_tokens:
        cases += [("add_sequence", (t,)), ("can_add_sequence", (t,)), ("extend", (a, t))]
        cases += [("decode_step", ([a], t))]
    for t in bad_tokens:
        cases += [("prefix_match", (t,))]
    for n in [n for n in hostile.BAD_COUNT_LIST if n is not None]:  # max_cached (None: no cap)
        cases += [("add_sequence", ([1], "", n)), ("can_add_sequence", ([1], "", n))]
    for b in hostile.NOT_BATCH_LIST + [[]]:
        cases += [("can_decode_step", (b,))]
    for h in hostile.bad_handle_values([a]):
        cases += [("can_decode_step", ([h],))]
    for h in hostile.bad_handle_values([a]):
        cases += [("commit", (h,)), ("extend", (h, [1])), ("decode_step", ([h], [1]))]
        cases += [("gather", (h, 0)), ("attention_decode", (0, [h], q)), ("trim", (h, 0))]
        cases += [("write_kv_batch", ([h], 0, [0], rows_b, rows_b)), ("can_extend", (h, 1))]
    for n in hostile.BAD_COUNT_LIST:
        cases += [("trim", (a, n)), ("evict", (n,)), ("can_extend", (a, n))]
        cases += [
            ("write_kv", (a, 0, n, rows, rows)),
            ("write_kv_batch", ([a], 0, [n], rows_b, rows_b)),
        ]
    for ns in hostile.BAD_NAMESPACE_LIST:
        cases += [("add_sequence", ([1], ns)), ("can_add_sequence", ([1], ns))]
    for layer in hostile.bad_layers(num_layers):
        cases += [("gather", (a, layer)), ("write_kv", (a, layer, 0, rows, rows))]
        cases += [("attention_decode", (layer, [a], q)), ("attention_prefill", (a, layer, q))]
    for scale in hostile.BAD_SCALE_LIST:
        cases += [("attention_decode", (0, [a], q, scale)), ("attention_prefill", (a, 0, q, scale))]
    for window in hostile.BAD_WINDOW_LIST:
        cases += [("attention_decode", (0, [a], q, None, window))]
    for b in hostile.NOT_BATCH_LIST:
        cases += [("decode_step", (b, [1])), ("write_kv_batch", (b, 0, [0], rows_b, rows_b))]
        cases += [("attention_decode", (0, b, q)), ("write_kv_batch", ([a], 0, b, rows_b, rows_b))]
    return cases


TABLE = every_hostile_class(a=0)  # populated() issues handle 0 first


@pytest.mark.parametrize("index", range(len(TABLE)), ids=lambda i: f"{TABLE[i][0]}-{i}")
def test_every_hostile_class_is_refused_alike(index):
    op, args = TABLE[index]
    errors = {impl: outcome(impl, op, args) for impl in IMPLS}
    assert len(set(errors.values())) == 1, f"{op}{args!r}: {errors}"


@settings(max_examples=60)
@given(data=st.data())
def test_accepted_forms_mean_the_same_thing(data):
    """Tokens as tuples, integer arrays, NumPy scalars or int subclasses; handles as NumPy
    integers or int subclasses: the same result as plain lists and ints, on both sides."""
    tokens = data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=12), label="tokens")
    form = data.draw(hostile.token_forms(tokens), label="form")
    results = []
    for impl in IMPLS:
        cache = cache_class(impl)(Config(num_blocks=16, block_size=4, store_kv=False))
        cache.commit(cache.add_sequence(list(range(8)))[0])
        seq, cached = cache.add_sequence(form)
        cache.extend(data.draw(hostile.handle_forms(seq), label="handle"), form)
        results.append((cache.tokens(seq), cached, cache.snapshot()))
    assert results[0][0] == tuple(tokens) * 2
    assert all(r == results[0] for r in results)


@pytest.mark.parametrize("impl", IMPLS)
def test_largest_token_id_is_accepted_and_the_next_refused(impl):
    cache, a, _ = populated(impl)
    top = 2**31 - 1
    seq, _ = cache.add_sequence(np.array([top, top], np.int64))
    assert cache.tokens(seq) == (top, top)
    with pytest.raises(E.InvalidTokensError):
        cache.extend(seq, [top + 1])


@pytest.mark.skipif(not HAVE_MLX, reason="the mlx-lm adapter needs MLX")
@settings(max_examples=60)
@given(tokens=hostile.bad_tokens(), sessions=st.sampled_from([None, 3, "ab", [], [None], (1,)]))
def test_adapter_refuses_hostile_input_and_changes_nothing(tokens, sessions):
    import mlx.core as mx

    from pagedkv.mlx_lm import PagedKVStore

    assume(not (isinstance(tokens, mx.array) and tokens.ndim == 1))  # the adapter takes these
    store = adapter_store()
    before = store.cache.snapshot()
    with pytest.raises(E.PagedKVError):
        store.open(tokens)
    with pytest.raises(E.PagedKVError):
        store.batch(sessions)
    assert store.cache.snapshot() == before and isinstance(store, PagedKVStore)


@cache
def adapter_store():
    from pagedkv.mlx_lm import PagedKVStore

    store = PagedKVStore(Config(num_blocks=8, block_size=4, num_kv_heads=1, head_dim=4))
    store.open(list(range(6)))
    return store


@pytest.mark.skipif(not HAVE_MLX, reason="the mlx-lm adapter needs MLX")
def test_adapter_takes_a_token_mx_array_and_the_largest_token_id():
    import mlx.core as mx

    from pagedkv.mlx_lm import PagedKVStore

    store = PagedKVStore(Config(num_blocks=8, block_size=4, num_kv_heads=1, head_dim=4))
    session = store.open(mx.array([5, 2**31 - 1, 7]))
    assert session.prompt == [5, 2**31 - 1, 7] == list(store.cache.tokens(session.seq))
    with pytest.raises(E.InvalidTokensError):
        store.open(mx.array([1.0, 2.0]))
    with pytest.raises(E.InvalidTokensError):
        store.open([2**31])
