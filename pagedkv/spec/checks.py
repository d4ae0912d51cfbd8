"""Input validation for the spec's public operations.

Every check runs before any state changes, so a rejected call leaves the cache untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pagedkv.errors import (
    InvalidArgumentError,
    InvalidTokensError,
    KVDtypeError,
    KVShapeError,
)

MAX_TOKEN = 2**31 - 1  # token ids must fit int32, the backend's token and table dtype


def as_tokens(tokens: Sequence[int] | np.ndarray, what: str) -> list[int]:
    """Returns the tokens as a list of Python ints. Raises InvalidTokensError if there are none,
    if one is not an integer (bools included), or if one is outside [0, 2**31)."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (Sequence, np.ndarray)):
        raise InvalidTokensError(
            f"{what}: tokens must be a list of ints, got {type(tokens).__name__}."
        )
    result: list[int] = []
    for token in tokens:
        if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
            raise InvalidTokensError(f"{what}: token {token!r} is not an int; pass token ids.")
        if not 0 <= int(token) <= MAX_TOKEN:
            raise InvalidTokensError(f"{what}: token {int(token)} is outside [0, 2**31).")
        result.append(int(token))
    if not result:
        raise InvalidTokensError(f"{what}: needs at least one token, got none.")
    return result


def as_count(value: object, what: str) -> int:
    """A non-negative int (bools rejected), else InvalidArgumentError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"{what} must be an int, got {value!r}.")
    if value < 0:
        raise InvalidArgumentError(f"{what} must be >= 0, got {value}.")
    return int(value)


def as_namespace(namespace: object) -> str:
    if not isinstance(namespace, str):
        raise InvalidArgumentError(
            f"namespace must be a str ('' for none), got {type(namespace).__name__}."
        )
    return namespace


def as_layer(layer: object, num_layers: int) -> int:
    if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
        raise InvalidArgumentError(f"layer must be an int, got {layer!r}.")
    if not 0 <= layer < num_layers:
        raise InvalidArgumentError(f"layer {layer} is outside [0, {num_layers}).")
    return int(layer)


def check_kv(
    keys: object, values: object, storage_dtype: type, dtype_name: str, kv_heads: int, head_dim: int
) -> int:
    """Both arrays `[n, kv_heads, head_dim]` with n >= 1, of the pool's dtype. Returns n."""
    for name, array in (("keys", keys), ("values", values)):
        if not isinstance(array, np.ndarray):
            raise KVDtypeError(f"{name} must be a numpy array, got {type(array).__name__}.")
        if array.dtype != storage_dtype:
            hint = " (bfloat16 K/V are passed to the spec as uint16 bit patterns)"
            raise KVDtypeError(
                f"{name} has dtype {array.dtype}, the cache stores {dtype_name}"
                f"{hint if dtype_name == 'bfloat16' else ''}; cast before writing."
            )
        if array.ndim != 3 or array.shape[0] < 1 or array.shape[1:] != (kv_heads, head_dim):
            raise KVShapeError(
                f"{name} has shape {array.shape}; expected [n >= 1, {kv_heads}, {head_dim}]."
            )
    if keys.shape != values.shape:  # type: ignore[union-attr]
        raise KVShapeError(f"keys {keys.shape} and values {values.shape} differ in shape.")  # type: ignore[union-attr]
    return keys.shape[0]  # type: ignore[union-attr]


def check_queries(
    queries: object, kv_heads: int, head_dim: int, batch_dim: int | None
) -> np.ndarray:
    """Queries `[batch_dim, q_heads, head_dim]` of a float dtype, q_heads a multiple of kv_heads.
    batch_dim None accepts any leading size >= 1. Returns them as float32."""
    if not isinstance(queries, np.ndarray) or not np.issubdtype(queries.dtype, np.floating):
        raise KVDtypeError(f"queries must be a float numpy array, got {type(queries).__name__}.")
    leading_ok = queries.ndim == 3 and (
        queries.shape[0] == batch_dim if batch_dim is not None else queries.shape[0] >= 1
    )
    if (
        not leading_ok
        or queries.shape[2] != head_dim
        or queries.shape[1] < 1
        or queries.shape[1] % kv_heads
    ):
        raise KVShapeError(
            f"queries have shape {queries.shape}; expected [{batch_dim or 'L'}, q_heads, "
            f"{head_dim}] "
            f"with q_heads a multiple of {kv_heads}."
        )
    return queries.astype(np.float32)


def as_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
        raise InvalidArgumentError(f"scale must be a finite float or None, got {scale!r}.")
    return float(scale)


def as_window(window: object) -> int | None:
    """A sliding window: None (every key visible) or an int >= 1 (the last `window` keys)."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise InvalidArgumentError(f"window must be None or an int >= 1, got {window!r}.")
    return int(window)


def check_sinks(sinks: object, q_heads: int) -> np.ndarray | None:
    """Attention sinks: None, or one finite float logit per query head `[q_heads]` (as float32)."""
    if sinks is None:
        return None
    if (
        not isinstance(sinks, np.ndarray)
        or not np.issubdtype(sinks.dtype, np.floating)
        or sinks.shape != (q_heads,)
        or not np.isfinite(sinks).all()
    ):
        raise InvalidArgumentError(
            f"sinks must be None or a finite float array of shape ({q_heads},) (one logit per "
            f"query head), got {getattr(sinks, 'shape', type(sinks).__name__)}."
        )
    return sinks.astype(np.float32)
