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
