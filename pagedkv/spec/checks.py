"""Input validation for the spec's public operations: the input contract (decision D6), in code.

Every check runs before any state changes, so a rejected call leaves the cache untouched. The
contract (the MLX backend enforces the same one, with its own code):

- An **integer** is a Python `int` (subclasses such as `IntEnum` members included) or a NumPy
  integer scalar. Never a `bool`, a float (not even `1.0`), a string or a 0-d array.
- A **token sequence** is a `list`, `tuple` or `range` of integers, or a 1-D NumPy array of an
  integer dtype, every token in [0, 2**31), at least one token. Nothing else: not a `str`, `bytes`,
  `bytearray`, `memoryview`, `array.array`, `deque`, iterator, set, 0-d or 2-D array, float or bool
  array, nor an MLX array (convert it with `.tolist()`). Refusals raise InvalidTokensError.
- A **handle** (sequence id) is an integer that add_sequence or fork returned and free has not
  ended. Anything else raises UnknownSequenceError.
- A **batch** (`seq_ids`, `starts`) is a `list`, `tuple`, `range` or 1-D NumPy array; each element
  is then checked as a handle or a count. Anything else raises InvalidArgumentError.
- A **count** (`num_tokens`, `start`, trim and evict counts) is an integer >= 0, a **layer** an
  integer in [0, num_layers), a **namespace** a `str`, a **scale** None or a finite real number
  (a Python or NumPy int or float, never a bool). Refusals raise InvalidArgumentError.

Arguments are checked in the order of the signature (the handle or handles first), then the
relations between them (one token per sequence, distinct sequences), then the state (positions,
writability, blocks available). So a call with several faults raises for the first, on both sides.
"""

from __future__ import annotations

import math

import numpy as np

from pagedkv.errors import (
    InvalidArgumentError,
    InvalidTokensError,
    KVDtypeError,
    KVShapeError,
)

MAX_TOKEN = 2**31 - 1  # token ids must fit int32, the backend's token and table dtype


def is_integer(value: object) -> bool:
    """The contract's integer: int or NumPy integer, never a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def as_tokens(tokens: object, what: str) -> list[int]:
    """Returns the tokens as a list of Python ints. Raises InvalidTokensError if `tokens` is not a
    token sequence (see the module docstring), is empty, or holds a non-integer or one outside
    [0, 2**31)."""
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise InvalidTokensError(
                f"{what}: a token array must be 1-D of an integer dtype, got {tokens.ndim}-D "
                f"{tokens.dtype}."
            )
    elif not isinstance(tokens, (list, tuple, range)):
        raise InvalidTokensError(
            f"{what}: tokens must be a list, tuple, range or 1-D integer numpy array of ints, "
            f"got {type(tokens).__name__}."
        )
    result: list[int] = []
    for token in tokens:
        if not is_integer(token):
            raise InvalidTokensError(f"{what}: token {token!r} is not an int; pass token ids.")
        if not 0 <= int(token) <= MAX_TOKEN:
            raise InvalidTokensError(f"{what}: token {int(token)} is outside [0, 2**31).")
        result.append(int(token))
    if not result:
        raise InvalidTokensError(f"{what}: needs at least one token, got none.")
    return result


def as_batch(values: object, what: str) -> list:
    """A batch argument as a list of its elements (checked later, one by one)."""
    if isinstance(values, np.ndarray) and values.ndim == 1:
        return list(values)
    if not isinstance(values, (list, tuple, range)):
        raise InvalidArgumentError(
            f"{what} must be a list, tuple, range or 1-D numpy array, got {type(values).__name__}."
        )
    return list(values)


def as_count(value: object, what: str) -> int:
    """A non-negative integer, else InvalidArgumentError."""
    if not is_integer(value):
        raise InvalidArgumentError(f"{what} must be an int, got {value!r}.")
    if value < 0:  # type: ignore[operator]
        raise InvalidArgumentError(f"{what} must be >= 0, got {value}.")
    return int(value)  # type: ignore[arg-type]


def as_namespace(namespace: object) -> str:
    if not isinstance(namespace, str):
        raise InvalidArgumentError(
            f"namespace must be a str ('' for none), got {type(namespace).__name__}."
        )
    return namespace


def as_layer(layer: object, num_layers: int) -> int:
    if not is_integer(layer):
        raise InvalidArgumentError(f"layer must be an int, got {layer!r}.")
    if not 0 <= layer < num_layers:  # type: ignore[operator]
        raise InvalidArgumentError(f"layer {layer} is outside [0, {num_layers}).")
    return int(layer)  # type: ignore[arg-type]


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
    """None (the default 1/sqrt(head_dim)) or a finite real number."""
    if scale is None:
        return head_dim**-0.5
    real = isinstance(scale, (int, float, np.integer, np.floating))
    if not real or isinstance(scale, (bool, np.bool_)):
        raise InvalidArgumentError(f"scale must be a finite float or None, got {scale!r}.")
    try:
        value = float(scale)  # type: ignore[arg-type]
    except OverflowError:  # an int too large for a float
        value = math.inf
    if not math.isfinite(value):
        raise InvalidArgumentError(f"scale must be a finite float or None, got {scale!r}.")
    return value


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
