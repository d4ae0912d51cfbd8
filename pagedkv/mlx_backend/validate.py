"""Argument checks of the backend (written independently of the spec's, raising the same errors)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from pagedkv.errors import InvalidArgumentError, InvalidTokensError, KVDtypeError, KVShapeError

_INT_TYPES = (int, np.integer)
_BOOL_TYPES = (bool, np.bool_)
_TOKEN_LIMIT = 1 << 31
_SEQUENCES = (list, tuple, range)


def is_int(value: object) -> bool:
    return isinstance(value, _INT_TYPES) and not isinstance(value, _BOOL_TYPES)


def token_list(tokens: object, op: str) -> list[int]:
    """list/tuple/range of ints or a 1-D integer numpy array -> list of ints in [0, 2**31)."""
    if type(tokens) is list and tokens and all(type(t) is int for t in tokens):
        if min(tokens) >= 0 and max(tokens) < _TOKEN_LIMIT:  # the hot path: plain ints
            return list(tokens)
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise InvalidTokensError(
                f"{op}: a token array must be 1-D of an integer dtype, got {tokens.ndim}-D "
                f"{tokens.dtype}."
            )
        tokens = tokens.tolist()  # Python ints
    elif not isinstance(tokens, _SEQUENCES):  # MLX arrays too: the spec cannot know them
        raise InvalidTokensError(
            f"{op}: tokens must be a list, tuple, range or 1-D integer numpy array of ints, "
            f"got {type(tokens).__name__}."
        )
    out = []
    for token in tokens:
        if not is_int(token):
            raise InvalidTokensError(f"{op}: token {token!r} is not an int; pass token ids.")
        if not 0 <= token < _TOKEN_LIMIT:
            raise InvalidTokensError(f"{op}: token {int(token)} is outside [0, 2**31).")
        out.append(int(token))
    if not out:
        raise InvalidTokensError(f"{op}: needs at least one token, got none.")
    return out


def batch(values: object, what: str) -> list:
    """seq_ids / starts: a list, tuple, range or 1-D numpy array (elements checked by callers)."""
    if isinstance(values, _SEQUENCES) or (isinstance(values, np.ndarray) and values.ndim == 1):
        return list(values)
    raise InvalidArgumentError(
        f"{what} must be a list, tuple, range or 1-D numpy array, got {type(values).__name__}."
    )


def count(value: object, what: str) -> int:
    if not is_int(value):
        raise InvalidArgumentError(f"{what} must be an int, got {value!r}.")
    if value < 0:
        raise InvalidArgumentError(f"{what} must be >= 0, got {value}.")
    return int(value)


def layer(value: object, num_layers: int) -> int:
    if not is_int(value) or not 0 <= value < num_layers:
        raise InvalidArgumentError(f"layer {value!r} is outside [0, {num_layers}).")
    return int(value)


def namespace(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(
            f"namespace must be a str ('' for none), got {type(value).__name__}."
        )
    return value


def kv_rows(keys: object, values: object, dtype: mx.Dtype, heads: int, dim: int) -> int:
    """keys/values: mx.array `[n >= 1, heads, dim]` of the pool dtype. Returns n."""
    for name, array in (("keys", keys), ("values", values)):
        if not isinstance(array, mx.array):
            raise KVDtypeError(f"{name} must be an mx.array, got {type(array).__name__}.")
        if array.dtype != dtype:
            raise KVDtypeError(f"{name} has dtype {array.dtype}, the pool stores {dtype}; cast it.")
        if array.ndim != 3 or array.shape[0] < 1 or tuple(array.shape[1:]) != (heads, dim):
            raise KVShapeError(
                f"{name} has shape {tuple(array.shape)}; expected [n >= 1, {heads}, {dim}]."
            )
    if keys.shape != values.shape:  # type: ignore[union-attr]
        raise KVShapeError(f"keys {keys.shape} and values {values.shape} differ.")  # type: ignore[union-attr]
    return keys.shape[0]  # type: ignore[union-attr]


def queries(array: object, heads: int, dim: int, batch: int | None) -> mx.array:
    """`[batch, q_heads, dim]` floats with q_heads a multiple of the K/V heads."""
    if not isinstance(array, mx.array) or not mx.issubdtype(array.dtype, mx.floating):
        raise KVDtypeError(f"queries must be a float mx.array, got {type(array).__name__}.")
    shape = tuple(array.shape)
    ok = (
        len(shape) == 3
        and (shape[0] == batch if batch is not None else shape[0] >= 1)
        and shape[2] == dim
        and shape[1] >= 1
        and shape[1] % heads == 0
    )
    if not ok:
        raise KVShapeError(
            f"queries have shape {shape}; expected [{batch or 'L'}, q_heads, {dim}] with q_heads "
            f"a multiple of {heads}."
        )
    return array


def scale(value: object, dim: int) -> float:
    if value is None:
        return dim**-0.5
    if isinstance(value, _BOOL_TYPES) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise InvalidArgumentError(f"scale must be a finite float or None, got {value!r}.")
    try:
        result = float(value)
    except OverflowError:  # a huge int
        result = math.inf
    if not math.isfinite(result):
        raise InvalidArgumentError(f"scale must be a finite float or None, got {value!r}.")
    return result


def window(value: object) -> int | None:
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise InvalidArgumentError(f"window must be None or an int >= 1, got {value!r}.")
    return int(value)


def sinks(array: object, q_heads: int) -> mx.array | None:
    if array is None:
        return None
    ok = (
        isinstance(array, mx.array)
        and mx.issubdtype(array.dtype, mx.floating)
        and tuple(array.shape) == (q_heads,)
        and bool(mx.all(mx.isfinite(array)).item())
    )
    if not ok:
        raise InvalidArgumentError(
            f"sinks must be None or a finite float array of shape ({q_heads},) (one logit per "
            f"query head), got {getattr(array, 'shape', type(array).__name__)}."
        )
    return array
