"""Decode rows written into the pools' own buffers (CUDA): the adapter's decode step, in place.

Why: MLX applies `pool[slot] = row` to the pool's buffer only when nothing else holds the pool.
In a pipelined decode (mlx-lm schedules step n + 1 while step n runs) the previous step's
kernels still hold it, so each write copied its whole pool. This kernel writes the rows where
they belong and the pool array is never replaced: on an H100 a Llama-3-8B batch-1 step ran at
1.028 of mlx-lm's dense cache in place against 0.967 with the copying writes, and with 16 times
the blocks at 1.006 against 0.699 (docs/benchmarks.md section 6, twelfth session).

Order. The kernel names the pools only as inputs, and MLX orders work by the arrays it reads and
writes, so nothing would wait for the rows. Its output is a copy of the step's block tables:
every reader of the step (the fused kernel, or the gather) takes that copy as its tables and so
runs after the write; the next write to the same pools takes it as `after`, so writes to one pool
keep their order. Every other use of the pools first completes the writes
(`KVStorage.settle`). The kernel's source is `write_rows.cu`.
"""

from __future__ import annotations

import os
from functools import cache

import mlx.core as mx

from pagedkv.errors import ConfigError
from pagedkv.mlx_backend.kernels import source
from pagedkv.mlx_backend.kernels.decode import (
    THREADS,
    backend,
    cuda_constants,
    pool_view,
    uses_pool_views,
)

ENV = "PAGEDKV_DECODE_WRITES"  # auto (in place where the device has the kernel) | functional
CHOICES = ("auto", "functional")


def setting() -> str:
    """`PAGEDKV_DECODE_WRITES`, checked: "auto" when unset. Raises ConfigError otherwise."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ConfigError(f"{ENV}={value!r}: use auto or functional (unset means auto).")
    return value


def in_place_device() -> bool:
    """Whether the default device has the kernel: a CUDA GPU. Metal keeps functional writes
    (the kernel has no Metal twin yet), and so does the CPU."""
    return backend() == "cuda"


@cache
def _kernel(dtype: mx.Dtype, row: int):
    """One kernel object per pool dtype and row size (MLX caches compiled kernels by name)."""
    name = f"pagedkv_write_rows_{str(dtype).split('.')[-1]}_r{row}"
    return mx.fast.cuda_kernel(
        name=name,
        input_names=["k_pool", "v_pool", "k_new", "v_new", "slots", "tables", "after"],
        output_names=["tables_out"],
        source=cuda_constants([("T", dtype), ("ROW", row)]) + source.sections("write")["write"],
    )


def write_rows(k_pool, v_pool, keys, values, slots, tables, after) -> mx.array:
    """keys/values `[n, kv_heads, head_dim]` (the pool's dtype) into the pools at `slots` `[n]`
    int32 (block * block_size + row), in the pools' buffers. Returns a copy of `tables` `[B, T]`
    int32: read the pools through it (see the module docstring). Inputs are trusted: the callers
    validated shapes, dtypes and slots."""
    row = k_pool.shape[2] * k_pool.shape[3]
    threads = max(tables.size, slots.size * row)
    if uses_pool_views():  # see decode.POOL_VIEWS: the kernel writes from the buffer's start
        k_pool, v_pool = pool_view(k_pool), pool_view(v_pool)
    (out,) = _kernel(k_pool.dtype, row)(
        inputs=[k_pool, v_pool, keys, values, slots, tables, after],
        grid=(-(-threads // THREADS) * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[tables.shape],
        output_dtypes=[mx.int32],
    )
    return out
