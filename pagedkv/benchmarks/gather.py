"""The paged decode-attention microbenchmark (no model).

Per cell (context, batch, block size), head_dim 128, 32 query heads over 8 K/V heads, float16, one
query per sequence, block ids scattered over a pool with 2x slack (a fragmented pool):

- `contiguous`: `mx.fast.scaled_dot_product_attention` on contiguous K/V — the reference. On the
  CUDA build this is MLX's default path (cuDNN); `contiguous_vector` is the same call with
  `MLX_CUDA_USE_CUDNN_SDPA=0` (MLX's own vector kernel), measured in a child process because MLX
  reads that switch once per process.
- `gather_sdpa`: gather the blocks (layout A), then SDPA — the portable path.
- `kernel`: the fused paged kernel (`pagedkv.mlx_backend.kernels`), where the device has one,
  called as a decode step calls it: its launch prepared once, then one call per layer.

Small cells sit on MLX's per-call floor, so each timing runs many calls per synchronize and divides
(`per_call_us`); a cell's paths are timed in turn, ROUNDS times, medians kept (`measure_cell`).
The calls are chained as a model's layers are: each call's query is the previous call's output
(`chained`). Unchained, MLX's CUDA graph may run consecutive calls at the same time,
and two calls reading the same K/V together share its reads in the L2 cache (50 MB on an H100),
which the layers of a decode step never can. Consecutive calls also read different copies of the
cell's arrays (at least COLD_BYTES of K/V in all), as a model's layers read different pools: a
small cell read again and again would come from the L2, which in a model the weights have long
evicted. A reduction over a 2 GiB array in the same run gives the device's read bandwidth, against
which the kernel's K/V bytes per second are reported.
"""

from __future__ import annotations

import itertools
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
COLD_BYTES = 256 * 2**20  # K/V read between two calls on the same copy: 5x an H100's L2
ROUNDS = 3  # a cell's paths timed in turn this many times (measure_cell), medians kept


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
        return kv_bytes(self.context, self.batch)

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


def kv_bytes(context: int, batch: int) -> int:
    return 2 * batch * context * KV_HEADS * HEAD_DIM * 2  # K and V, float16


def copies_for(context: int, batch: int) -> int:
    """Copies of a cell's arrays to cycle through so that no call finds its K/V in the L2."""
    return max(1, min(32, ceil_div(COLD_BYTES, kv_bytes(context, batch))))


def cycling(calls):
    """One call per invocation, each on the next copy (see the module docstring)."""
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def chained(calls, query):
    """One call per invocation, each on the next copy, each given the previous call's output as
    its query (`calls`: query -> output of the query's shape), as a model's layers depend on each
    other. Independent calls can run at the same time in MLX's CUDA graph: two of them reading one
    copy of K/V together share its reads in the L2, which no decode step can (module docstring)."""
    turn = itertools.cycle(calls)
    last = [query]

    def call():
        last[0] = next(turn)(last[0])
        return last[0]

    return call


def per_call_us(fn, max_calls: int = 200, budget_s: float = 0.02, repeats: int = 3) -> float:
    """Median over `repeats` of: n calls issued back to back, one eval + synchronize, / n.
    n is sized from one call timed after three untimed ones: chained calls give the first call
    the cell's query and later ones an output, whose layout may differ (cuDNN then builds another
    plan), and a slow timed call would leave n too small to hide the eval+synchronize floor."""
    import mlx.core as mx

    for _ in range(3):
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


def parse_cells(text: str) -> list[tuple[int, int]]:
    """'2048x1,4096x16' -> [(2048, 1), (4096, 16)] (the GPU tools' cell lists); ValueError on
    anything else."""
    cells = []
    for item in text.split(","):
        context, sep, batch = item.partition("x")
        if not (sep and context.isdigit() and batch.isdigit() and int(context) and int(batch)):
            raise ValueError(f"a cell is CONTEXTxBATCH with both >= 1, got {item!r}")
        cells.append((int(context), int(batch)))
    return cells


def cell_arrays(
    context: int,
    batch: int,
    block: int,
    dtype=None,
    copies: int | None = None,
    kv_heads: int = KV_HEADS,
):
    """Query, the fragmented pools and tables, and the same K/V contiguous; the pools and the
    contiguous K/V as `copies` copies (lists; default `copies_for`). dtype: float16 unless given.
    `kv_heads`: the benchmark's 8 unless given, with Q_HEADS / KV_HEADS query heads each."""
    import mlx.core as mx
    import numpy as np

    from pagedkv.mlx_backend.kernels import DecodeBatch

    per_seq = ceil_div(context, block)
    pool_blocks = 2 * batch * per_seq  # 2x slack
    mx.random.seed(0)
    shape = (pool_blocks, block, kv_heads, HEAD_DIM)
    dtype = dtype or mx.float16
    k_pool = mx.random.normal(shape).astype(dtype)
    v_pool = mx.random.normal(shape).astype(dtype)
    order = np.random.default_rng(0).permutation(pool_blocks)[: batch * per_seq]
    tables = mx.array(order.reshape(batch, per_seq).astype(np.int32))
    query = mx.random.normal((batch, kv_heads * (Q_HEADS // KV_HEADS), HEAD_DIM)).astype(dtype)

    def contiguous(pool):  # [B, H, ctx, D]
        taken = mx.take(pool, tables.reshape(-1), axis=0)
        return mx.contiguous(
            taken.reshape(batch, per_seq * block, kv_heads, HEAD_DIM)[:, :context].transpose(
                0, 2, 1, 3
            )
        )

    dense_k, dense_v = contiguous(k_pool), contiguous(v_pool)
    bounds = mx.array(np.array([[0, context]] * batch, np.int32))
    decode_batch = DecodeBatch(tables, bounds, context)
    copies = copies or copies_for(context, batch)
    pools = [(k_pool, v_pool)] + [(k_pool + 0, v_pool + 0) for _ in range(copies - 1)]
    dense = [(dense_k, dense_v)] + [(dense_k + 0, dense_v + 0) for _ in range(copies - 1)]
    mx.eval(pools, dense, query, tables, bounds)
    return query, pools, dense, decode_batch


def path_calls(pools, dense, decode_batch) -> dict[str, list]:
    """Per path, one call per copy of a cell's arrays: query `[B, q_heads, 1, D]` -> output of
    the same shape (what `chained` strings together). The kernel is called as a decode step calls
    it (`pagedkv.mlx_lm.step`): its launch prepared once (`decode.prepare`: plan, split count,
    the step's tables), then one call per layer; where the device has no kernel that path is
    absent."""
    import mlx.core as mx

    from pagedkv.mlx_backend.attention import gather_decode
    from pagedkv.mlx_backend.kernels import decode

    scale = HEAD_DIM**-0.5
    calls = {
        "contiguous": [
            lambda q, k=k, v=v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
            for k, v in dense
        ],
        "gather_sdpa": [
            lambda q, k=k, v=v: gather_decode(q, k, v, decode_batch, scale) for k, v in pools
        ],
    }
    if decode.backend() is not None:
        k_pool = pools[0][0]  # [blocks, block_size, kv_heads, head_dim]
        q_heads = k_pool.shape[2] * (Q_HEADS // KV_HEADS)
        query = mx.zeros((decode_batch.tables.shape[0], q_heads, 1, HEAD_DIM), k_pool.dtype)
        launch = decode.prepare(query, k_pool, decode_batch, scale, has_sinks=False)
        calls["kernel"] = [lambda q, k=k, v=v: launch(q, k, v) for k, v in pools]
    return calls


def path_chains(context: int, batch: int, block: int, arrays=None) -> dict[str, tuple]:
    """Per path of one cell: (its calls chained as `chained` strings them, the most calls one
    timing may issue). `arrays`: `cell_arrays(context, batch, block)` if already built."""
    query, pools, dense, decode_batch = arrays or cell_arrays(context, batch, block)
    chains = {}
    for path, calls in path_calls(pools, dense, decode_batch).items():
        max_calls = 200
        if path == "gather_sdpa":  # each call's gathered copy stays in memory until the eval
            k_pool = pools[0][0]  # [blocks, block_size, kv_heads, head_dim]
            row_bytes = 2 * k_pool.itemsize * k_pool.shape[2] * HEAD_DIM  # K and V of a position
            copies = 4 * 2**30 // (row_bytes * decode_batch.tables.size * block)
            max_calls = max(1, min(200, copies))
        chains[path] = (chained(calls, query[:, :, None, :]), max_calls)
    return chains


def contiguous_us(context: int, batch: int, block: int) -> float:
    chain, max_calls = path_chains(context, batch, block)["contiguous"]
    return per_call_us(chain, max_calls=max_calls)


def in_turn(chains: dict, rounds: int, max_calls: dict | None = None) -> dict[str, list[float]]:
    """Every chain timed once per round, in turn (`per_call_us`, one repeat), `rounds` times:
    a drift of the device moves every chain alike. {name: µs per call, one value per round}.
    `max_calls`: per name, the most calls one timing may issue (default per_call_us's)."""
    limits = max_calls or {}
    times: dict[str, list[float]] = {name: [] for name in chains}
    for _ in range(rounds):
        for name, chain in chains.items():
            limit = {"max_calls": limits[name]} if name in limits else {}
            times[name].append(per_call_us(chain, repeats=1, **limit))
    return times


def measure_cell(
    context: int, batch: int, block: int, read_tb_s: float, vector_us: float
) -> GatherCell:
    """Every path of the cell timed in turn, ROUNDS times, the median of each kept: a drift of
    the device over the cell's seconds (clocks, other tenants) then moves every path alike
    instead of whichever was timed last, and the ratios the targets are stated in hold."""
    chains = path_chains(context, batch, block)
    times = in_turn({path: chain for path, (chain, _) in chains.items()}, ROUNDS,
                    {path: max_calls for path, (_, max_calls) in chains.items()})  # fmt: skip
    us = {path: statistics.median(values) for path, values in times.items()}
    return GatherCell(
        context, batch, block, us["contiguous"], vector_us, us["gather_sdpa"],
        us.get("kernel", NAN), read_tb_s,
    )  # fmt: skip


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
