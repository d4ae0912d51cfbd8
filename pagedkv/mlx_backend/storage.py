"""K/V pools on MLX: per layer, K and V each `[num_blocks, block_size, kv_heads, head_dim]` (layout A).

Writes go through `pool[...] = rows`, which MLX lowers to a scatter/slice-update whose output takes
the place of the pool. Each pool array is referenced only from `self.keys` / `self.values`, so
when the update is evaluated MLX can donate the old buffer and write in place: O(rows), not
O(pool). Anything that reads a pool lazily (a gather not yet evaluated) holds a second reference
and forces a copy on the next write; `copy_rows` therefore materialises its source first.
"""

from __future__ import annotations

import mlx.core as mx

from pagedkv.config import Config

MLX_DTYPE = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class KVStorage:
    def __init__(self, config: Config) -> None:
        shape = (config.num_blocks, config.block_size, config.num_kv_heads, config.head_dim)
        self.dtype = MLX_DTYPE[config.dtype]
        self.block_size = config.block_size
        self.keys = [mx.zeros(shape, self.dtype) for _ in range(config.num_layers)]
        self.values = [mx.zeros(shape, self.dtype) for _ in range(config.num_layers)]
        mx.eval(self.keys, self.values)

    def write_rows(
        self, layer: int, runs: list[tuple[int, int, int, int]], keys: mx.array, values: mx.array
    ) -> None:
        """runs: (block, first row, rows, offset into keys) — one contiguous run per block."""
        pool_k, pool_v = self.keys[layer], self.values[layer]
        if len(runs) == 1 and runs[0][2] == keys.shape[0]:  # one run of every row: no slicing
            block, row, rows, _ = runs[0]
            pool_k[block, row : row + rows] = keys
            pool_v[block, row : row + rows] = values
        else:
            for block, row, rows, offset in runs:
                pool_k[block, row : row + rows] = keys[offset : offset + rows]
                pool_v[block, row : row + rows] = values[offset : offset + rows]
        mx.async_eval(pool_k, pool_v)  # schedule now: another thread cannot evaluate this one's

    def scatter_rows(
        self,
        layer: int,
        block_index: mx.array,
        row_index: mx.array,
        keys: mx.array,
        values: mx.array,
    ) -> None:
        """keys[i] / values[i] (`[n, heads, dim]`) to (blocks[i], rows[i]): one scatter per pool.
        block_index, row_index: `[n]` int32."""
        self.keys[layer][block_index, row_index] = keys
        self.values[layer][block_index, row_index] = values
        mx.async_eval(self.keys[layer], self.values[layer])  # see write_rows

    def copy_rows(self, source: int, target: int, rows: int) -> None:
        """Copy-on-write of the first `rows` rows of `source` into `target`, in every layer."""
        index = mx.array([source])
        sources = [mx.take(pool, index, axis=0)[0, :rows] for pool in (*self.keys, *self.values)]
        mx.eval(sources)  # materialise first, so the writes below can still donate the pools
        for pool, rows_data in zip((*self.keys, *self.values), sources):
            pool[target, :rows] = rows_data
        mx.eval(self.keys, self.values)

    def gather(self, layer: int, blocks: mx.array, length: int) -> tuple[mx.array, mx.array]:
        """The first `length` rows of the given blocks, in order: each `[length, heads, dim]`."""
        keys = mx.take(self.keys[layer], blocks, axis=0)  # [n, block_size, heads, dim]
        values = mx.take(self.values[layer], blocks, axis=0)
        flat = (-1, *keys.shape[2:])
        return keys.reshape(flat)[:length], values.reshape(flat)[:length]
