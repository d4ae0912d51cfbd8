"""Hostile input: Hypothesis strategies for malformed arguments, and for the other accepted forms
of good ones. Shared by the bad-input tests (tests/unit/test_hostile.py) and the differential
machine, so any new disagreement between the spec and the backend fails CI.

The contract they probe is in `pagedkv/spec/checks.py`. `calls(live, num_layers)` draws
`(operation, args)` with at least one argument that breaks the contract, so every call must raise a
pagedkv error and change nothing. K/V and query arrays appear as `Rows`/`Queries` placeholders that
each implementation turns into its own array type (`native`).
"""

from __future__ import annotations

import array
import collections
import importlib.util
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

HAVE_MLX = importlib.util.find_spec("mlx") is not None


class Int(int):
    """An int subclass (like an IntEnum member): an integer by the contract."""


# ---- valid inputs in every accepted form ---------------------------------------------------------


TOKEN_FORMS = 7


def token_form(tokens: list[int], form: int) -> object:
    """The same tokens as a list (form 0), tuple, 1-D integer arrays, NumPy scalars or int
    subclasses (forms 1..6)."""
    return [
        lambda: list(tokens),
        lambda: tuple(tokens),
        lambda: np.array(tokens, np.int64),
        lambda: np.array(tokens, np.int32),
        lambda: np.array(tokens, np.uint32),
        lambda: [np.int64(t) for t in tokens],
        lambda: [Int(t) for t in tokens],
    ][form]()


def token_forms(tokens: list[int]) -> st.SearchStrategy:
    return st.integers(0, TOKEN_FORMS - 1).map(lambda form: token_form(tokens, form))


def handle_forms(handle: int) -> st.SearchStrategy:
    return st.sampled_from([handle, np.int64(handle), np.int32(handle), Int(handle)])


# ---- malformed inputs ----------------------------------------------------------------------------

BAD_TOKEN_VALUE_LIST = [-1, 2**31, 10**30, 1.0, True, np.bool_(True), None, "1", np.float32(2)]
BAD_TOKEN_VALUE_LIST += [[1], np.array(1), np.int64(-1), np.uint64(2**63), 0.5]
BAD_TOKEN_VALUES = st.sampled_from(BAD_TOKEN_VALUE_LIST)


def bad_token_containers() -> list:
    """Every kind of object that is not a token sequence, and the empty ones."""
    values = [
        None,
        3,
        "abc",
        b"ab",
        bytearray(b"ab"),
        memoryview(b"ab"),
        array.array("i", [1, 2]),
        collections.deque([1, 2]),
        {1, 2},
        {1: 2},
        np.array(3),
        np.zeros((2, 2), np.int64),
        np.array([1.0, 2.0]),
        np.array([True]),
        np.array([1, 2], dtype=object),
        [],
        (),
        range(0),
        np.array([], np.int64),
        2.5,
    ]
    if HAVE_MLX:
        import mlx.core as mx

        values += [mx.array([1, 2]), mx.array(3)]
    return values


@st.composite
def bad_tokens(draw) -> object:
    """Not a token sequence, empty, or holding one bad token somewhere."""
    if draw(st.booleans()):
        return draw(st.sampled_from(bad_token_containers()))
    good = draw(st.lists(st.integers(0, 9), max_size=5))
    at = draw(st.integers(0, len(good)))
    tokens = good[:at] + [draw(BAD_TOKEN_VALUES)] + good[at:]
    return tuple(tokens) if draw(st.booleans()) else tokens


def bad_handle_values(live: list[int]) -> list:
    """Never a live handle: unknown integers, or a live one as a float, bool, str, array..."""
    h = live[0] if live else 0
    return [10**6, -1, 10**30, np.int64(10**9), float(h), str(h), np.float64(h), np.array(h)] + [
        [h],
        None,
        True,
        False,
        np.bool_(True),
        b"0",
    ]


def bad_handle(live: list[int]) -> st.SearchStrategy:
    unknown = st.one_of(st.integers(10**6, 10**7), st.integers(-(10**6), -1))
    return st.one_of(unknown, st.sampled_from(bad_handle_values(live)))


BAD_COUNT_LIST = [-1, -(10**30), 1.5, None, True, "3", np.float32(1), np.array(2), [1]]
BAD_COUNT_LIST += [np.int64(-3), 2.0]
BAD_COUNTS = st.sampled_from(BAD_COUNT_LIST)
BAD_NAMESPACE_LIST = [None, 3, b"ns", ["a"], 1.5]
BAD_NAMESPACES = st.sampled_from(BAD_NAMESPACE_LIST)
BAD_SCALE_LIST = ["x", True, np.bool_(False), float("nan"), float("inf"), -float("inf"), 10**400]
BAD_SCALE_LIST += [[1.0], np.array(1.0), complex(1, 0), np.float64("nan")]
BAD_SCALES = st.sampled_from(BAD_SCALE_LIST)
BAD_WINDOW_LIST = [0, -1, 1.5, True, np.bool_(True), "2", np.array(2), [2]]
NOT_BATCH_LIST = [None, 3, "ab", {1, 2}, {1: 2}, np.array(1), iter([1]), 2.5]
NOT_BATCHES = st.sampled_from(NOT_BATCH_LIST)


def bad_layers(num_layers: int) -> list:
    return [-1, num_layers, 10**30, 1.0, True, None, np.array(0), "0"]


def bad_layer(num_layers: int) -> st.SearchStrategy:
    return st.sampled_from(bad_layers(num_layers))


def bad_batch(live: list[int], allow_repeats_and_empty: bool = False) -> st.SearchStrategy:
    """Not a batch, a batch holding a bad handle, or (for batched writes) empty / repeated."""
    good = st.lists(st.sampled_from(live), max_size=3) if live else st.just([])
    with_bad = st.tuples(good, bad_handle(live)).map(lambda gb: gb[0] + [gb[1]])
    options = [NOT_BATCHES, with_bad]
    if not allow_repeats_and_empty:
        options.append(st.just([]))
        if live:
            options.append(st.sampled_from(live).map(lambda h: [h, h]))
    return st.one_of(*options)


# ---- whole calls -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """K or V rows `[count, kv_heads, head_dim]` (or `[batch, count, ...]`) of the pool dtype."""

    count: int
    batch: int | None = None


@dataclass(frozen=True)
class Queries:
    """Float32 queries `[count, kv_heads, head_dim]`."""

    count: int


def native(args: tuple, to_native, queries, config) -> tuple:
    """args with Rows/Queries placeholders replaced by the implementation's arrays.
    to_native(float32 array, dtype) and queries(float32 array) are the implementation's."""
    heads, dim = config.num_kv_heads, config.head_dim

    def convert(arg):
        if isinstance(arg, Rows):
            shape = (arg.count, heads, dim) if arg.batch is None else (arg.batch, arg.count)
            shape = shape if arg.batch is None else (*shape, heads, dim)
            return to_native(np.zeros(shape, np.float32), config.dtype)
        if isinstance(arg, Queries):
            return queries(np.ones((arg.count, heads, dim), np.float32))
        return arg

    return tuple(convert(arg) for arg in args)


def _size(batch: object) -> int:
    return len(batch) if isinstance(batch, (list, tuple)) else 1


@st.composite
def calls(draw, live: list[int], num_layers: int) -> tuple[str, tuple]:
    """(operation, args) with at least one argument that breaks the contract."""
    good_handle = st.sampled_from(live).flatmap(handle_forms) if live else st.just(0)
    handle = st.one_of(good_handle, bad_handle(live)) if live else bad_handle(live)
    good_tokens = st.lists(st.integers(0, 9), min_size=1, max_size=4).flatmap(token_forms)
    count = st.integers(0, 3)
    layer = st.integers(0, num_layers - 1)
    bad = draw(st.sampled_from(["handle", "tokens", "count", "layer", "batch", "other"]))

    def pick(kind: str, good: st.SearchStrategy, hostile: st.SearchStrategy):
        """The hostile value for the argument chosen to be bad, else good or hostile."""
        if kind == bad:
            return draw(hostile)
        return draw(good if draw(st.integers(0, 3)) else st.one_of(good, hostile))

    h = pick("handle", good_handle, bad_handle(live))
    if bad == "handle":
        op = draw(
            st.sampled_from(
                ["extend", "can_extend", "commit", "fork", "free", "trim", "sequence_length"]
                + ["tokens", "block_table", "gather", "write_kv", "attention_prefill"]
            )
        )
    elif bad == "tokens":
        op = draw(st.sampled_from(["add_sequence", "can_add_sequence", "extend", "decode_step"]))
    elif bad == "count":
        op = draw(st.sampled_from(["can_extend", "trim", "evict", "write_kv", "write_kv_batch"]))
    elif bad == "layer":
        op = draw(
            st.sampled_from(
                ["gather", "write_kv", "write_kv_batch", "attention_decode", "attention_prefill"]
            )
        )
    elif bad == "batch":
        op = draw(st.sampled_from(["decode_step", "write_kv_batch", "attention_decode"]))
    else:  # namespace or scale
        op = draw(
            st.sampled_from(
                ["add_sequence", "can_add_sequence", "attention_decode", "attention_prefill"]
            )
        )
    if op in ("add_sequence", "can_add_sequence"):
        tokens = pick("tokens", good_tokens, bad_tokens())
        namespace = pick("other", st.just(""), BAD_NAMESPACES)
        if bad not in ("tokens", "other"):
            tokens = draw(bad_tokens())
        return op, (tokens, namespace)
    if op == "extend":
        tokens = pick("tokens", good_tokens, bad_tokens())
        return op, (h if bad == "handle" else draw(handle), tokens)
    if op in ("can_extend", "trim"):
        return op, (h if bad == "handle" else draw(handle), pick("count", count, BAD_COUNTS))
    if op in ("commit", "fork", "free", "sequence_length", "tokens", "block_table"):
        return op, (h,)
    if op == "evict":
        return op, (draw(BAD_COUNTS),)
    if op == "gather":
        return op, (h, pick("layer", layer, bad_layer(num_layers)))
    if op == "write_kv":
        args = (h, pick("layer", layer, bad_layer(num_layers)), pick("count", count, BAD_COUNTS))
        return op, (*args, Rows(1), Rows(1))
    if op == "attention_prefill":
        args = (h, pick("layer", layer, bad_layer(num_layers)), Queries(1))
        return op, (*args, pick("other", st.just(None), BAD_SCALES))
    good_batch = st.lists(st.sampled_from(live or [0]), min_size=1, max_size=3, unique=True)
    batch = pick("batch", good_batch, bad_batch(live, op == "attention_decode"))
    if op == "decode_step":
        tokens = pick("tokens", good_tokens, bad_tokens())
        if bad != "batch" and bad != "tokens":
            tokens = draw(bad_tokens())
        return op, (batch, tokens)
    if op == "write_kv_batch":
        starts = draw(st.lists(count, min_size=_size(batch), max_size=_size(batch)))
        if bad == "count":
            starts = draw(st.one_of(NOT_BATCHES, st.just(starts + [draw(BAD_COUNTS)])))
        size = _size(batch)
        rows = (Rows(1, size), Rows(1, size))
        return op, (batch, pick("layer", layer, bad_layer(num_layers)), starts, *rows)
    # attention_decode
    scale = pick("other", st.just(None), BAD_SCALES)
    return op, (pick("layer", layer, bad_layer(num_layers)), batch, Queries(_size(batch)), scale)
