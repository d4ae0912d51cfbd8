"""The one error hierarchy raised by both the spec and the MLX backend.

Both implementations raise the same class for the same cause, and an operation that raises leaves
the cache exactly as it was. Messages say what was asked, what the state allowed, and what to do.
"""


class PagedKVError(Exception):
    """Base class of every error pagedkv raises on purpose."""


class ConfigError(PagedKVError, ValueError):
    """A Config field is out of range (non-positive sizes, unknown dtype, ...)."""


class OutOfBlocksError(PagedKVError):
    """An operation needs more blocks than are free or evictable right now."""


class UnknownSequenceError(PagedKVError, KeyError):
    """The sequence handle was never issued, or its sequence was already freed."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class InvalidTokensError(PagedKVError, ValueError):
    """Tokens are empty where some are needed, not integers, or outside [0, 2**31)."""


class InvalidArgumentError(PagedKVError, ValueError):
    """A scalar argument (count, layer, namespace, scale, ...) is of the wrong type or range."""


class InvalidPositionError(PagedKVError, IndexError):
    """K/V rows were addressed outside the sequence's positions [0, len)."""


class NotWritableError(PagedKVError):
    """A write targets a block the sequence does not own exclusively (shared or in the prefix index)."""


class KVShapeError(PagedKVError, ValueError):
    """K/V or query arrays have the wrong shape for this cache."""


class KVDtypeError(PagedKVError, TypeError):
    """K/V arrays do not have the cache's dtype."""


class TrimError(PagedKVError, ValueError):
    """A trim asks to drop more tokens than the sequence holds."""


class StorageDisabledError(PagedKVError):
    """K/V storage was asked for on a metadata-only cache (Config.store_kv is False)."""


class InvariantError(PagedKVError, AssertionError):
    """check_invariants() found the cache in a state the rules forbid (a bug, never user error)."""


class UnsupportedModelError(PagedKVError, ValueError):
    """A model uses a cache feature the mlx-lm adapter cannot run exactly (refused up front)."""


# ---- messages ----------------------------------------------------------------------------------
# Every message both implementations raise is built here, once: the same cause gives the same text
# on both sides (tests/unit/test_hostile.py compares them). Each function returns the error to
# raise. Where the two sides' array types differ, the caller names its own (`kind`).


def not_a_config(config: object) -> ConfigError:
    return ConfigError(f"PagedCache needs a pagedkv.Config, got {type(config).__name__}.")


def unknown_sequence(seq_id: object, live) -> UnknownSequenceError:
    return UnknownSequenceError(
        f"sequence {seq_id!r} is unknown or was freed; live sequences: {sorted(live)[:8]}. "
        "Use a handle returned by add_sequence or fork."
    )


def out_of_blocks(asked: str, needed: int, available: int, num_blocks: int) -> OutOfBlocksError:
    return OutOfBlocksError(
        f"{asked} needs {needed} new blocks but only {available} are free or evictable "
        f"(of {num_blocks}); free or trim sequences, or use a larger pool."
    )


def can_extend_zero() -> InvalidArgumentError:
    return InvalidArgumentError(
        "can_extend num_tokens must be >= 1 (extend takes at least one token), got 0."
    )


def not_one_token_each(sequences: int, distinct: int, tokens: int) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"decode_step needs distinct sequences and one token each; got {sequences} "
        f"sequences ({distinct} distinct) and {tokens} tokens."
    )


def not_distinct(asked: str, sequences: int, distinct: int) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{asked} needs distinct sequences; got {sequences} sequences ({distinct} distinct)."
    )


def not_one_start_each(sequences: int, starts: int) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"write_kv_batch needs distinct sequences and one start each; got {sequences} "
        f"sequences and {starts} starts."
    )


def trim_too_long(num_tokens: int, seq_id: int, length: int) -> TrimError:
    return TrimError(
        f"trim({num_tokens}) of sequence {seq_id}, which holds {length} tokens; "
        "trim at most its length."
    )


def trim_reaches_released(num_tokens: int, seq_id: int, window: int, most: int) -> TrimError:
    return TrimError(
        f"trim({num_tokens}) of sequence {seq_id} would leave its last position a key the "
        f"sliding window ({window}) already released (rule 10); trim at most {most}."
    )


def storage_disabled(asked: str) -> StorageDisabledError:
    return StorageDisabledError(
        f"{asked} needs K/V storage but this cache is metadata-only; "
        "create it with Config(store_kv=True)."
    )


def write_past_end(start: int, rows: int, seq_id: int, length: int) -> InvalidPositionError:
    return InvalidPositionError(
        f"write_kv of positions [{start}, {start + rows}) but sequence {seq_id} has "
        f"{length} positions; extend it first."
    )


def write_released(position: int, seq_id: int) -> NotWritableError:
    return NotWritableError(
        f"write_kv at position {position} of sequence {seq_id}: the sliding window "
        "released it (rule 10); released positions are never written."
    )


def write_shared(block: int, seq_id: int, refcount: int) -> NotWritableError:
    return NotWritableError(
        f"write_kv into block {block} of sequence {seq_id}, which is shared "
        f"(refcount {refcount}) or indexed; its K/V is already "
        "stored. Write only positions that add_sequence/extend reserved afresh."
    )


def batch_kv_shape(name: str, sequences: int, shape: object) -> KVShapeError:
    return KVShapeError(
        f"write_kv_batch {name} must be [{sequences}, n, kv_heads, head_dim], got {shape}."
    )


def window_released(asked: str, query: int, start: int, seq_id: int, held_from: int):
    return InvalidPositionError(
        f"{asked}: the query at position {query} needs K/V from position "
        f"{start}, but sequence {seq_id} holds K/V from {held_from} on "
        "(the sliding window released the rest); query later positions only."
    )


def empty_sequence(seq_id: int) -> InvalidPositionError:
    return InvalidPositionError(f"attention_decode over empty sequence {seq_id}.")


def prefill_queries(count: int, seq_id: int, length: int) -> InvalidPositionError:
    return InvalidPositionError(
        f"attention_prefill with {count} queries but sequence {seq_id} has {length} "
        "positions; pass 1..len queries."
    )


# Input checks (`spec/checks.py`, `mlx_backend/checks.py`).


def token_array(what: str, ndim: int, dtype: object) -> InvalidTokensError:
    return InvalidTokensError(
        f"{what}: a token array must be 1-D of an integer dtype, got {ndim}-D {dtype}."
    )


def not_tokens(what: str, tokens: object) -> InvalidTokensError:
    return InvalidTokensError(
        f"{what}: tokens must be a list, tuple, range or 1-D integer numpy array of ints, "
        f"got {type(tokens).__name__}."
    )


def token_not_int(what: str, token: object) -> InvalidTokensError:
    return InvalidTokensError(f"{what}: token {token!r} is not an int; pass token ids.")


def token_out_of_range(what: str, token: int) -> InvalidTokensError:
    return InvalidTokensError(f"{what}: token {token} is outside [0, 2**31).")


def no_tokens(what: str) -> InvalidTokensError:
    return InvalidTokensError(f"{what}: needs at least one token, got none.")


def not_a_batch(what: str, values: object) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{what} must be a list, tuple, range or 1-D numpy array, got {type(values).__name__}."
    )


def not_an_int(what: str, value: object) -> InvalidArgumentError:
    return InvalidArgumentError(f"{what} must be an int, got {value!r}.")


def negative(what: str, value: object) -> InvalidArgumentError:
    return InvalidArgumentError(f"{what} must be >= 0, got {value}.")


def not_a_namespace(namespace: object) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"namespace must be a str ('' for none), got {type(namespace).__name__}."
    )


def layer_out_of_range(layer: object, num_layers: int) -> InvalidArgumentError:
    return InvalidArgumentError(f"layer {layer} is outside [0, {num_layers}).")


def not_an_array(name: str, kind: str, value: object) -> KVDtypeError:
    """kind: the implementation's array type ("numpy array", "mx.array")."""
    return KVDtypeError(f"{name} must be a {kind}, got {type(value).__name__}.")


def kv_dtype(name: str, dtype: object, stores: object, hint: str = "") -> KVDtypeError:
    return KVDtypeError(f"{name} has dtype {dtype}, the cache stores {stores}{hint}; cast it.")


def kv_shape(name: str, shape: tuple, kv_heads: int, head_dim: int) -> KVShapeError:
    return KVShapeError(f"{name} has shape {shape}; expected [n >= 1, {kv_heads}, {head_dim}].")


def kv_shapes_differ(keys_shape: tuple, values_shape: tuple) -> KVShapeError:
    return KVShapeError(f"keys {keys_shape} and values {values_shape} differ in shape.")


def queries_shape(shape: tuple, batch: int | None, kv_heads: int, head_dim: int) -> KVShapeError:
    return KVShapeError(
        f"queries have shape {shape}; expected [{batch or 'L'}, q_heads, {head_dim}] "
        f"with q_heads a multiple of {kv_heads}."
    )


def bad_scale(scale: object) -> InvalidArgumentError:
    return InvalidArgumentError(f"scale must be a finite float or None, got {scale!r}.")


def bad_window(window: object) -> InvalidArgumentError:
    return InvalidArgumentError(f"window must be None or an int >= 1, got {window!r}.")


def bad_sinks(sinks: object, q_heads: int) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"sinks must be None or a finite float array of shape ({q_heads},) (one logit per "
        f"query head), got {getattr(sinks, 'shape', type(sinks).__name__)}."
    )
