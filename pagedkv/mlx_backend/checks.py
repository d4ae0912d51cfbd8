"""Argument checks of the backend (mirrors `pagedkv.spec.checks`, which states the input contract;
written independently, raising the same errors with the same messages)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from pagedkv import errors

_INT_TYPES = (int, np.integer)
_BOOL_TYPES = (bool, np.bool_)
_TOKEN_LIMIT = 1 << 31
_SEQUENCES = (list, tuple, range)


def is_integer(value: object) -> bool:
    return isinstance(value, _INT_TYPES) and not isinstance(value, _BOOL_TYPES)


def as_tokens(tokens: object, op: str) -> list[int]:
    """list/tuple/range of ints or a 1-D integer numpy array -> list of ints in [0, 2**31)."""
    if type(tokens) is list and tokens and all(type(t) is int for t in tokens):
        if min(tokens) >= 0 and max(tokens) < _TOKEN_LIMIT:  # the hot path: plain ints
            return list(tokens)
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise errors.token_array(op, tokens.ndim, tokens.dtype)
        tokens = tokens.tolist()  # Python ints
    elif not isinstance(tokens, _SEQUENCES):  # MLX arrays too: the spec cannot know them
        raise errors.not_tokens(op, tokens)
    out = []
    for token in tokens:
        if not is_integer(token):
            raise errors.token_not_int(op, token)
        if not 0 <= token < _TOKEN_LIMIT:
            raise errors.token_out_of_range(op, int(token))
        out.append(int(token))
    if not out:
        raise errors.no_tokens(op)
    return out


def as_batch(values: object, what: str) -> list:
    """seq_ids / starts: a list, tuple, range or 1-D numpy array (elements checked by callers)."""
    if isinstance(values, _SEQUENCES) or (isinstance(values, np.ndarray) and values.ndim == 1):
        return list(values)
    raise errors.not_a_batch(what, values)


def as_count(value: object, what: str) -> int:
    if not is_integer(value):
        raise errors.not_an_int(what, value)
    if value < 0:
        raise errors.negative(what, value)
    return int(value)


def as_layer(value: object, num_layers: int) -> int:
    if not is_integer(value):
        raise errors.not_an_int("layer", value)
    if not 0 <= value < num_layers:
        raise errors.layer_out_of_range(value, num_layers)
    return int(value)


def as_namespace(value: object) -> str:
    if not isinstance(value, str):
        raise errors.not_a_namespace(value)
    return value


def check_kv(keys: object, values: object, dtype: mx.Dtype, heads: int, dim: int) -> int:
    """keys/values: mx.array `[n >= 1, heads, dim]` of the pool dtype. Returns n."""
    for name, array in (("keys", keys), ("values", values)):
        if not isinstance(array, mx.array):
            raise errors.not_an_array(name, "mx.array", array)
        if array.dtype != dtype:
            raise errors.kv_dtype(name, array.dtype, dtype)
        if array.ndim != 3 or array.shape[0] < 1 or tuple(array.shape[1:]) != (heads, dim):
            raise errors.kv_shape(name, tuple(array.shape), heads, dim)
    if keys.shape != values.shape:  # type: ignore[union-attr]
        raise errors.kv_shapes_differ(tuple(keys.shape), tuple(values.shape))  # type: ignore[union-attr]
    return keys.shape[0]  # type: ignore[union-attr]


def check_queries(array: object, heads: int, dim: int, batch: int | None) -> mx.array:
    """`[batch, q_heads, dim]` floats with q_heads a multiple of the K/V heads."""
    if not isinstance(array, mx.array) or not mx.issubdtype(array.dtype, mx.floating):
        raise errors.not_an_array("queries", "float mx.array", array)
    shape = tuple(array.shape)
    ok = (
        len(shape) == 3
        and (shape[0] == batch if batch is not None else shape[0] >= 1)
        and shape[2] == dim
        and shape[1] >= 1
        and shape[1] % heads == 0
    )
    if not ok:
        raise errors.queries_shape(shape, batch, heads, dim)
    return array


def as_scale(value: object, dim: int) -> float:
    if value is None:
        return dim**-0.5
    if isinstance(value, _BOOL_TYPES) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise errors.bad_scale(value)
    try:
        result = float(value)
    except OverflowError:  # a huge int
        result = math.inf
    if not math.isfinite(result):
        raise errors.bad_scale(value)
    return result


def as_window(value: object) -> int | None:
    if value is None:
        return None
    if not is_integer(value) or value < 1:
        raise errors.bad_window(value)
    return int(value)


def check_sinks(array: object, q_heads: int) -> mx.array | None:
    if array is None:
        return None
    ok = (
        isinstance(array, mx.array)
        and mx.issubdtype(array.dtype, mx.floating)
        and tuple(array.shape) == (q_heads,)
        and bool(mx.all(mx.isfinite(array)).item())
    )
    if not ok:
        raise errors.bad_sinks(array, q_heads)
    return array
