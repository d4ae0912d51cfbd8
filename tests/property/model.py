"""The reference model the state machines compare against, and how they talk to the spec.

`prefix_kv` plays the model: the K/V row of position p is a function of the layer and the tokens
0..p, exactly as in a transformer. So every correct way of obtaining a row (writing it, sharing a
cached prefix block, forking, copy-on-write) yields the same bytes, and the dense model of a sequence
is just its token list. Values are multiples of 1/256 in [-0.5, 0.5), exact in every pool dtype.

`spec_native` / `mlx_native` put float32 rows into each implementation's storage form; `SpecImpl`
is the spec's adapter for the machines (the MLX one lives in `test_differential_machine.py`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from pagedkv.config import Config
from pagedkv.spec import PagedCache as SpecCache


@lru_cache(maxsize=100_000)
def _row(prefix_hash: int, layer: int, salt: int, width: int) -> np.ndarray:
    lanes = np.arange(width, dtype=np.int64)
    mixed = (
        (prefix_hash % 1000003) * 2654435761 + layer * 97 + salt * 7919 + lanes * 40503
    ) % 1000003
    return ((mixed % 256) / 256.0 - 0.5).astype(np.float32)


def prefix_kv(tokens: tuple[int, ...], layer: int, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """K and V `[len(tokens), kv_heads, head_dim]` float32 that a model would produce."""
    width = config.num_kv_heads * config.head_dim
    keys, values, running = [], [], 17
    for token in tokens:
        running = (running * 1000003 + token + 1) % (2**61 - 1)
        keys.append(_row(running, layer, 1, width))
        values.append(_row(running, layer, 2, width))
    shape = (len(tokens), config.num_kv_heads, config.head_dim)
    if not tokens:
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    return np.stack(keys).reshape(shape), np.stack(values).reshape(shape)


def spec_native(array: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as the spec stores them (bfloat16 as its uint16 bits, rounded to nearest)."""
    if dtype == "bfloat16":
        bits = array.astype(np.float32).view(np.uint32)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest even, like MLX
        return (rounded >> 16).astype(np.uint16)
    return array.astype({"float32": np.float32, "float16": np.float16}[dtype])


def mlx_native(array: np.ndarray, dtype: str):
    import mlx.core as mx

    return mx.array(array.astype(np.float32)).astype(getattr(mx, dtype))


class SpecImpl:
    """How the machine talks to the spec: K/V as NumPy, bfloat16 as uint16 bit patterns."""

    name = "spec"

    @staticmethod
    def make(config: Config):
        return SpecCache(config)

    to_native = staticmethod(spec_native)

    @staticmethod
    def to_bits(array) -> np.ndarray:
        """Raw bytes of a gathered array, for bit-exact comparison across implementations."""
        return np.ascontiguousarray(array).view(np.uint8)

    @staticmethod
    def to_float32(array, dtype: str) -> np.ndarray:
        if dtype == "bfloat16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(np.float32)

    @staticmethod
    def queries(array: np.ndarray):
        return array

    @staticmethod
    def output(array) -> np.ndarray:
        return np.asarray(array, dtype=np.float32)
