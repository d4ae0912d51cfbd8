"""The paged decode-attention microbenchmark (no model).

Per cell (context, batch, block size), head_dim 128, 32 query heads over 8 K/V heads, float16, one
query per sequence, block ids scattered over a pool with 2x slack (a fragmented pool):

- `contiguous`: `mx.fast.scaled_dot_product_attention` on contiguous K/V — the reference. On the
  CUDA build this is MLX's default path (cuDNN); `contiguous_vector` is the same call with
  `MLX_CUDA_USE_CUDNN_SDPA=0` (MLX's own vector kernel), measured in a child process because MLX
  reads that switch once per process.
- `gather_sdpa`: gather the blocks (layout A), then SDPA — the portable path.
- `kernel`: the fused paged kernel (`pagedkv.mlx_backend.kernels`), where the device has one.

Small cells sit on MLX's per-call floor, so each timing runs many calls per synchronize and divides
(`per_call_us`). A reduction over a 2 GiB array in the same run gives the device's read bandwidth,
against which the kernel's K/V bytes per second are reported.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from pagedkv.config import ceil_div

QUICK = dict(contexts=(1024, 4096), batches=(1, 4), blocks=(16,))
FULL = dict(contexts=(1024, 4096, 16384, 32768), batches=(1, 4, 16), blocks=(16, 32, 64))
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
NAN = float("nan")


@dataclass
class GatherCell:
    context: int
    batch: int
    block: int
    contiguous_us: float
    contiguous_vector_us: float  # NaN where there is no cuDNN switch (not the CUDA build)
    gather_sdpa_us: float
    kernel_us: float  # NaN where the device has no kernel
    read_tb_s: float  # the device's read bandwidth, same run

    @property
    def kv_bytes(self) -> int:
        return 2 * self.batch * self.context * KV_HEADS * HEAD_DIM * 2  # K and V, float16

    @property
    def kernel_tb_s(self) -> float:
        return self.kv_bytes / (self.kernel_us * 1e-6) / 1e12

    @property
    def kernel_vs_contiguous(self) -> float:
        return self.kernel_us / self.contiguous_us

    @property
    def kernel_vs_vector(self) -> float:
        return self.kernel_us / self.contiguous_vector_us

    @property
    def gather_vs_contiguous(self) -> float:
        return self.gather_sdpa_us / self.contiguous_us


def per_call_us(fn, max_calls: int = 200, budget_s: float = 0.02, repeats: int = 3) -> float:
    """Median over `repeats` of: n calls issued back to back, one eval + synchronize, / n."""
    import mlx.core as mx

    mx.eval(fn())
    mx.synchronize()
    start = time.perf_counter()
    mx.eval(fn())
    mx.synchronize()
    single = time.perf_counter() - start
    calls = max(1, min(max_calls, math.ceil(budget_s / max(single, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [fn() for _ in range(calls)]
        mx.eval(outs)
        mx.synchronize()
        times.append((time.perf_counter() - start) / calls)
    return 1e6 * statistics.median(times)


def read_bandwidth_tb_s() -> float:
    """Bytes per second of a sum over a 2 GiB float16 array: the device's read ceiling."""
    import mlx.core as mx

    data = mx.ones((2**30,), mx.float16)
    mx.eval(data)
    seconds = per_call_us(lambda: mx.sum(data), max_calls=20) * 1e-6
    return data.nbytes / seconds / 1e12


def cell_arrays(context: int, batch: int, block: int):
    """Query, the fragmented pools and tables, and the same K/V contiguous."""
    import mlx.core as mx
    import numpy as np

    from pagedkv.mlx_backend.kernels import DecodeBatch

    per_seq = ceil_div(context, block)
    pool_blocks = 2 * batch * per_seq  # 2x slack
    mx.random.seed(0)
    shape = (pool_blocks, block, KV_HEADS, HEAD_DIM)
    k_pool = mx.random.normal(shape).astype(mx.float16)
    v_pool = mx.random.normal(shape).astype(mx.float16)
    order = np.random.default_rng(0).permutation(pool_blocks)[: batch * per_seq]
    tables = mx.array(order.reshape(batch, per_seq).astype(np.int32))
    query = mx.random.normal((batch, Q_HEADS, HEAD_DIM)).astype(mx.float16)

    def contiguous(pool):  # [B, H, ctx, D]
        taken = mx.take(pool, tables.reshape(-1), axis=0)
        return mx.contiguous(
            taken.reshape(batch, per_seq * block, KV_HEADS, HEAD_DIM)[:, :context].transpose(
                0, 2, 1, 3
            )
        )

    dense_k, dense_v = contiguous(k_pool), contiguous(v_pool)
    bounds = mx.array(np.array([[0, context]] * batch, np.int32))
    decode_batch = DecodeBatch(tables, bounds, context)
    mx.eval(k_pool, v_pool, dense_k, dense_v, query, tables, bounds)
    return query, k_pool, v_pool, dense_k, dense_v, decode_batch


def contiguous_us(context: int, batch: int, block: int) -> float:
    import mlx.core as mx

    query, _, _, dense_k, dense_v, _ = cell_arrays(context, batch, block)
    q = query[:, :, None, :]
    return per_call_us(
        lambda: mx.fast.scaled_dot_product_attention(q, dense_k, dense_v, scale=HEAD_DIM**-0.5)
    )


def measure_cell(
    context: int, batch: int, block: int, read_tb_s: float, vector_us: float
) -> GatherCell:
    import mlx.core as mx

    from pagedkv.mlx_backend.attention import gather_decode
    from pagedkv.mlx_backend.kernels import decode

    query, k_pool, v_pool, dense_k, dense_v, decode_batch = cell_arrays(context, batch, block)
    scale = HEAD_DIM**-0.5
    q = query[:, :, None, :]
    contiguous = per_call_us(
        lambda: mx.fast.scaled_dot_product_attention(q, dense_k, dense_v, scale=scale)
    )
    gathered_bytes = 2 * k_pool.itemsize * decode_batch.tables.size * block * KV_HEADS * HEAD_DIM
    gather = per_call_us(
        lambda: gather_decode(query, k_pool, v_pool, decode_batch, scale),
        max_calls=max(1, min(200, 4 * 2**30 // gathered_bytes)),  # gathered copies stay in memory
    )
    kernel = NAN
    if decode.backend() is not None:
        kernel = per_call_us(
            lambda: decode.paged_decode(query, k_pool, v_pool, decode_batch, scale)
        )
    return GatherCell(context, batch, block, contiguous, vector_us, gather, kernel, read_tb_s)


def vector_sdpa_us(cells: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], float]:
    """Contiguous SDPA with MLX's own vector kernel (cuDNN off), per cell, from a child process.
    NaN everywhere off the CUDA build, where the switch does not exist."""
    import mlx.core as mx

    if not (mx.default_device() == mx.gpu and mx.cuda.is_available()):
        return {cell: NAN for cell in cells}
    env = dict(os.environ, MLX_CUDA_USE_CUDNN_SDPA="0")
    child = subprocess.run(
        [sys.executable, "-m", "pagedkv.benchmarks.gather", json.dumps(cells)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {tuple(cell): us for cell, us in json.loads(child.stdout.strip().splitlines()[-1])}


if __name__ == "__main__":  # the child of vector_sdpa_us: one JSON line [[cell, us], ...]
    wanted = [tuple(c) for c in json.loads(sys.argv[1])]
    print(json.dumps([[list(c), contiguous_us(*c)] for c in wanted]))
