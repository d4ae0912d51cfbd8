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

from pagedkv import errors

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
            raise errors.token_array(what, tokens.ndim, tokens.dtype)
    elif not isinstance(tokens, (list, tuple, range)):
        raise errors.not_tokens(what, tokens)
    result: list[int] = []
    for token in tokens:
        if not is_integer(token):
            raise errors.token_not_int(what, token)
        if not 0 <= int(token) <= MAX_TOKEN:
            raise errors.token_out_of_range(what, int(token))
        result.append(int(token))
    if not result:
        raise errors.no_tokens(what)
    return result


def as_batch(values: object, what: str) -> list:
    """A batch argument as a list of its elements (checked later, one by one)."""
    if isinstance(values, np.ndarray) and values.ndim == 1:
        return list(values)
    if not isinstance(values, (list, tuple, range)):
        raise errors.not_a_batch(what, values)
    return list(values)


def as_count(value: object, what: str) -> int:
    """A non-negative integer, else InvalidArgumentError."""
    if not is_integer(value):
        raise errors.not_an_int(what, value)
    if value < 0:  # type: ignore[operator]
        raise errors.negative(what, value)
    return int(value)  # type: ignore[arg-type]


def as_namespace(namespace: object) -> str:
    if not isinstance(namespace, str):
        raise errors.not_a_namespace(namespace)
    return namespace


def as_layer(layer: object, num_layers: int) -> int:
    if not is_integer(layer):
        raise errors.not_an_int("layer", layer)
    if not 0 <= layer < num_layers:  # type: ignore[operator]
        raise errors.layer_out_of_range(layer, num_layers)
    return int(layer)  # type: ignore[arg-type]


def check_kv(
    keys: object, values: object, storage_dtype: type, dtype_name: str, kv_heads: int, head_dim: int
) -> int:
    """Both arrays `[n, kv_heads, head_dim]` with n >= 1, of the pool's dtype. Returns n."""
    for name, array in (("keys", keys), ("values", values)):
        if not isinstance(array, np.ndarray):
            raise errors.not_an_array(name, "numpy array", array)
        if array.dtype != storage_dtype:
            hint = " (bfloat16 K/V are passed to the spec as uint16 bit patterns)"
            hint = hint if dtype_name == "bfloat16" else ""
            raise errors.kv_dtype(name, array.dtype, dtype_name, hint)
        if array.ndim != 3 or array.shape[0] < 1 or array.shape[1:] != (kv_heads, head_dim):
            raise errors.kv_shape(name, array.shape, kv_heads, head_dim)
    if keys.shape != values.shape:  # type: ignore[union-attr]
        raise errors.kv_shapes_differ(keys.shape, values.shape)  # type: ignore[union-attr]
    return keys.shape[0]  # type: ignore[union-attr]


def check_queries(
    queries: object, kv_heads: int, head_dim: int, batch_dim: int | None
) -> np.ndarray:
    """Queries `[batch_dim, q_heads, head_dim]` of a float dtype, q_heads a multiple of kv_heads.
    batch_dim None accepts any leading size >= 1. Returns them as float32."""
    if not isinstance(queries, np.ndarray) or not np.issubdtype(queries.dtype, np.floating):
        raise errors.not_an_array("queries", "float numpy array", queries)
    leading_ok = queries.ndim == 3 and (
        queries.shape[0] == batch_dim if batch_dim is not None else queries.shape[0] >= 1
    )
    if (
        not leading_ok
        or queries.shape[2] != head_dim
        or queries.shape[1] < 1
        or queries.shape[1] % kv_heads
    ):
        raise errors.queries_shape(queries.shape, batch_dim, kv_heads, head_dim)
    return queries.astype(np.float32)


def as_scale(scale: object, head_dim: int) -> float:
    """None (the default 1/sqrt(head_dim)) or a finite real number."""
    if scale is None:
        return head_dim**-0.5
    real = isinstance(scale, (int, float, np.integer, np.floating))
    if not real or isinstance(scale, (bool, np.bool_)):
        raise errors.bad_scale(scale)
    try:
        value = float(scale)  # type: ignore[arg-type]
    except OverflowError:  # an int too large for a float
        value = math.inf
    if not math.isfinite(value):
        raise errors.bad_scale(scale)
    return value


def as_window(window: object) -> int | None:
    """A sliding window: None (every key visible) or an int >= 1 (the last `window` keys)."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise errors.bad_window(window)
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
        raise errors.bad_sinks(sinks, q_heads)
    return sinks.astype(np.float32)
