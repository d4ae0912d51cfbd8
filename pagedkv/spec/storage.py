"""K/V storage: per layer, K and V arrays in layout A `[num_blocks, block_size, kv_heads, head_dim]`.

NumPy has no bfloat16, so the spec stores bfloat16 pools as their uint16 bit patterns and accepts
and returns bfloat16 K/V as uint16 arrays. float32 and float16 are stored as themselves.
"""

from __future__ import annotations

import numpy as np

from pagedkv.config import Config

NUMPY_STORAGE_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Widens stored values to float32 (bfloat16 bit patterns become the floats they encode)."""
    if dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


class KVStorage:
    """The pools. Rows are addressed by (block, row); nothing here knows about sequences."""

    def __init__(self, config: Config) -> None:
        shape = (config.num_blocks, config.block_size, config.num_kv_heads, config.head_dim)
        dtype = NUMPY_STORAGE_DTYPE[config.dtype]
        self.keys = [np.zeros(shape, dtype) for _ in range(config.num_layers)]
        self.values = [np.zeros(shape, dtype) for _ in range(config.num_layers)]

    def write_rows(
        self, layer: int, blocks: np.ndarray, rows: np.ndarray, keys: np.ndarray, values: np.ndarray
    ) -> None:
        """Stores keys[i] / values[i] (each `[kv_heads, head_dim]`) at (blocks[i], rows[i])."""
        self.keys[layer][blocks, rows] = keys
        self.values[layer][blocks, rows] = values

    def copy_rows(self, source: int, target: int, num_rows: int) -> None:
        """Copy-on-write: the first `num_rows` rows of `source` into `target`, in every layer."""
        for pool in (*self.keys, *self.values):
            pool[target, :num_rows] = pool[source, :num_rows]

    def read_rows(
        self, layer: int, blocks: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.keys[layer][blocks, rows], self.values[layer][blocks, rows]
