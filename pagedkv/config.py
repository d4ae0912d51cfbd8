"""Config: the shape of a paged KV cache, shared by the spec and the MLX backend."""

from __future__ import annotations

from dataclasses import dataclass

from pagedkv.errors import ConfigError

DTYPES = ("float32", "float16", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def ceil_div(numerator: int, denominator: int) -> int:
    """ceil(numerator / denominator) for ints, denominator > 0: the one ceiling division of the
    package (the blocks a number of tokens needs, the splits a number of keys needs, ...)."""
    return -(-numerator // denominator)


@dataclass(frozen=True)
class Config:
    """Sizes of the block pool.

    One block id names the same slot in every layer's pool. Per layer, K and V are each stored as
    `[num_blocks, block_size, num_kv_heads, head_dim]` (layout A). With `store_kv=False` the cache
    keeps metadata only, so very large workloads can be simulated without K/V arrays.

    `window` (positions, or None for full attention) makes every layer a sliding-window layer: a
    query at position q attends to keys (q - window, q], and blocks wholly before the window of
    every present and future query are released (rule 10 in `pagedkv.spec.rules`), so a
    sequence's memory stays bounded by the window plus a block.
    """

    num_blocks: int
    block_size: int
    num_layers: int = 1
    num_kv_heads: int = 1
    head_dim: int = 8
    dtype: str = "float32"
    store_kv: bool = True
    window: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"Config.{name} must be a positive int, got {value!r}; pass e.g. {name}=16."
                )
        if self.dtype not in DTYPES:
            raise ConfigError(f"Config.dtype must be one of {DTYPES}, got {self.dtype!r}.")
        if self.window is not None and (
            not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1
        ):
            raise ConfigError(
                f"Config.window must be None or a positive int, got {self.window!r}; pass e.g. "
                "window=4096 for a sliding-window model."
            )
        if not isinstance(self.store_kv, bool):
            raise ConfigError(f"Config.store_kv must be a bool, got {self.store_kv!r}.")

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block occupies across all layers, K and V together."""
        per_layer = 2 * self.block_size * self.num_kv_heads * self.head_dim
        return per_layer * self.num_layers * DTYPE_BYTES[self.dtype]

    @property
    def pool_bytes(self) -> int:
        """Bytes of the whole K/V pool (0 in metadata-only mode)."""
        return self.num_blocks * self.bytes_per_block if self.store_kv else 0
