"""K/V pools on MLX: per layer, K and V each `[num_blocks, block_size, kv_heads, head_dim]` (layout A).

Writes go through `pool[...] = rows`, which MLX lowers to a scatter/slice-update whose output takes
the place of the pool. Each pool array is referenced only from `self._keys` / `self._values`, so
when the update is evaluated MLX can donate the old buffer and write in place: O(rows), not
O(pool). Anything that reads a pool lazily (a gather not yet evaluated) holds a second reference
and forces a copy on the next write; `copy_rows` therefore materialises its source first.

In a pipelined decode the previous step's kernels still hold the pools, so the mlx-lm adapter
writes its decode rows in place on CUDA (`write_in_place`, `kernels/write.py`): the rows go into
the pool's buffer and the pool array stays. Those writes are ordered only for the readers that
take their output; every other method here first completes them (`settle`). What that changes: a
write is not ordered after earlier reads of the rows it overwrites, so a lazy read of positions
that were later trimmed or freed and written again in place, if evaluated together with (or
after) the new write, may see the new rows (a functional write would have left it the old ones).
"""

from __future__ import annotations

import threading

import mlx.core as mx

from pagedkv.config import Config
from pagedkv.mlx_backend.kernels import write

MLX_DTYPE = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class KVStorage:
    def __init__(self, config: Config) -> None:
        shape = (config.num_blocks, config.block_size, config.num_kv_heads, config.head_dim)
        self.dtype = MLX_DTYPE[config.dtype]
        self.block_size = config.block_size
        self._keys = [mx.zeros(shape, self.dtype) for _ in range(config.num_layers)]
        self._values = [mx.zeros(shape, self.dtype) for _ in range(config.num_layers)]
        mx.eval(self._keys, self._values)
        # layer -> the output of its newest in-place write, maybe not yet evaluated
        self.unsettled: dict[int, mx.array] = {}
        self._unsettled_lock = threading.Lock()

    @property
    def keys(self) -> list[mx.array]:
        """Every layer's K pool, once every in-place write has completed (reading them here
        completes the writes: `settle`). A decode step reads `pools(layer)` instead."""
        self.settle()
        return self._keys

    @property
    def values(self) -> list[mx.array]:
        """Every layer's V pool; see `keys`."""
        self.settle()
        return self._values

    def pools(self, layer: int) -> tuple[mx.array, mx.array]:
        """One layer's (K, V) pools as they are, in-place writes maybe still pending: for readers
        ordered after those writes (through their output) or that settled the layer first."""
        return self._keys[layer], self._values[layer]

    def write_in_place(
        self, layer: int, slots: mx.array, keys: mx.array, values: mx.array, tables: mx.array
    ) -> mx.array:
        """keys/values `[n, heads, dim]` (the pool's dtype) into the pools' buffers at `slots`
        `[n]` int32 (block * block_size + row). Returns a copy of `tables` `[B, T]` int32 that is
        ready only after the write: whatever reads these pools in this step reads through it.
        CUDA only (`write.in_place_device`); inputs are trusted."""
        pool_k, pool_v = self._keys[layer], self._values[layer]
        with self._unsettled_lock:
            after = self.unsettled.get(layer, tables)  # the previous write first
            tables = write.write_rows(pool_k, pool_v, keys, values, slots, tables, after)
            self.unsettled[layer] = tables
        return tables

    def settle(self, layer: int | None = None) -> None:
        """Completes the in-place writes to one layer's pools (None: every layer's), so that a
        read or a functional write that is not ordered after them sees them and copies nothing
        they still hold. Cheap when there are none."""
        if not self.unsettled:
            return
        with self._unsettled_lock:  # taken whole: a write made meanwhile is never dropped
            if layer is None:
                pending = list(self.unsettled.values())
                self.unsettled.clear()
            else:
                token = self.unsettled.pop(layer, None)
                pending = [] if token is None else [token]
        if pending:
            mx.eval(pending)

    def write_rows(
        self, layer: int, runs: list[tuple[int, int, int, int]], keys: mx.array, values: mx.array
    ) -> None:
        """runs: (block, first row, rows, offset into keys) — one contiguous run per block."""
        self.settle(layer)
        pool_k, pool_v = self._keys[layer], self._values[layer]
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
        self.settle(layer)
        self._keys[layer][block_index, row_index] = keys
        self._values[layer][block_index, row_index] = values
        mx.async_eval(self._keys[layer], self._values[layer])  # see write_rows

    def copy_rows(self, source: int, target: int, rows: int) -> None:
        """Copy-on-write of the first `rows` rows of `source` into `target`, in every layer."""
        self.settle()
        index = mx.array([source])
        pools = (*self._keys, *self._values)
        sources = [mx.take(pool, index, axis=0)[0, :rows] for pool in pools]
        mx.eval(sources)  # materialise first, so the writes below can still donate the pools
        for pool, rows_data in zip(pools, sources):
            pool[target, :rows] = rows_data
        mx.eval(pools)

    def gather(self, layer: int, blocks: mx.array, length: int) -> tuple[mx.array, mx.array]:
        """The first `length` rows of the given blocks, in order: each `[length, heads, dim]`."""
        self.settle(layer)
        keys = mx.take(self._keys[layer], blocks, axis=0)  # [n, block_size, heads, dim]
        values = mx.take(self._values[layer], blocks, axis=0)
        flat = (-1, *keys.shape[2:])
        return keys.reshape(flat)[:length], values.reshape(flat)[:length]
