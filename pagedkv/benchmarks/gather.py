"""The page-gather decode microbenchmark (no model), after the seed project's sweep.

Per cell (context, batch, block size) with head_dim 128, 32 query heads, 8 K/V heads, float16:
contiguous SDPA (the lower bound), gather-then-SDPA for layout A `[blocks, block, heads, dim]` and
for the head-split layout B `[heads, blocks, block, dim]`, the gather alone per layout, and the
per-step append of one token's K/V row per layout. Block ids are scattered (reverse order over a
pool with 2x slack); the context is padded to a block multiple so every path does the same work.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedkv.benchmarks.common import median_seconds, synced

QUICK = dict(contexts=(1024, 4096), batches=(1, 4), blocks=(16,))
FULL = dict(contexts=(1024, 4096, 16384, 32768), batches=(1, 4, 16), blocks=(16, 32, 64))
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


@dataclass
class GatherCell:
    context: int
    batch: int
    block: int
    padded: int
    fragmentation_pct: float
    contiguous_us: float
    gather_sdpa_a_us: float
    gather_sdpa_b_us: float
    gather_only_a_us: float
    gather_only_b_us: float
    append_a_us: float
    append_b_us: float

    @property
    def overhead_a_pct(self) -> float:
        return 100 * (self.gather_sdpa_a_us / self.contiguous_us - 1)

    @property
    def overhead_b_pct(self) -> float:
        return 100 * (self.gather_sdpa_b_us / self.contiguous_us - 1)


def gather_paths(context: int, batch: int, block: int):
    """Builds the arrays of one cell; returns (padded context, {path name: synced callable})."""
    import mlx.core as mx

    padded = -(-context // block) * block
    per_seq = padded // block
    pool_blocks = 2 * batch * per_seq  # 2x slack
    dtype = mx.float16
    mx.random.seed(0)
    query = mx.random.normal((batch, Q_HEADS, 1, HEAD_DIM)).astype(dtype)
    dense_k = mx.random.normal((batch, KV_HEADS, padded, HEAD_DIM)).astype(dtype)
    dense_v = mx.random.normal((batch, KV_HEADS, padded, HEAD_DIM)).astype(dtype)
    pools = {
        "A": [
            mx.random.normal((pool_blocks, block, KV_HEADS, HEAD_DIM)).astype(dtype)
            for _ in range(2)
        ],
        "B": [
            mx.random.normal((KV_HEADS, pool_blocks, block, HEAD_DIM)).astype(dtype)
            for _ in range(2)
        ],
    }
    ids = mx.arange(pool_blocks - 1, pool_blocks - 1 - batch * per_seq, -1).astype(mx.int32)
    row = mx.random.normal((KV_HEADS, HEAD_DIM)).astype(dtype)
    mx.eval(query, dense_k, dense_v, pools, ids, row)
    scale = HEAD_DIM**-0.5

    def gather(layout: str, pool):
        if layout == "A":  # [n, block, H, D] -> [B, H, ctx, D]
            taken = mx.take(pool, ids, axis=0).reshape(batch, padded, KV_HEADS, HEAD_DIM)
            return taken.transpose(0, 2, 1, 3)
        taken = mx.take(pool, ids, axis=1).reshape(KV_HEADS, batch, padded, HEAD_DIM)
        return taken.transpose(1, 0, 2, 3)

    def attend(keys, values):
        return mx.fast.scaled_dot_product_attention(query, keys, values, scale=scale)

    def appender(layout: str):
        target = int(ids[0].item())

        def append():  # one token's row into one block of both pools (the pool is reassigned)
            for pool in pools[layout]:
                if layout == "A":
                    pool[target, block - 1] = row
                else:
                    pool[:, target, block - 1] = row
            return pools[layout]

        return append

    paths = {
        "contiguous": lambda: attend(dense_k, dense_v),
        "gather_sdpa_a": lambda: attend(gather("A", pools["A"][0]), gather("A", pools["A"][1])),
        "gather_sdpa_b": lambda: attend(gather("B", pools["B"][0]), gather("B", pools["B"][1])),
        "gather_only_a": lambda: [gather("A", p) for p in pools["A"]],
        "gather_only_b": lambda: [gather("B", p) for p in pools["B"]],
        "append_a": appender("A"),
        "append_b": appender("B"),
    }
    return padded, {name: synced(fn) for name, fn in paths.items()}


def measure_cell(context: int, batch: int, block: int, repeats: int) -> GatherCell:
    padded, paths = gather_paths(context, batch, block)
    times = {name: 1e6 * median_seconds(fn, repeats) for name, fn in paths.items()}
    return GatherCell(
        context,
        batch,
        block,
        padded,
        100 * (padded - context) / padded,
        times["contiguous"],
        times["gather_sdpa_a"],
        times["gather_sdpa_b"],
        times["gather_only_a"],
        times["gather_only_b"],
        times["append_a"],
        times["append_b"],
    )
