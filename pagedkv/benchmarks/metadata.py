"""Host-side metadata cost of one decode step, and the cost of writing one decode token.

decode step: `decode_step` extends every sequence of the batch by one token, and each sequence is
committed whenever a block fills (metadata only, no K/V). Half the batch are forks sharing a partial tail, so the first step
copies on write. Pool writes: one token's K/V into every layer of a 64 MiB vs a large pool.
"""

from __future__ import annotations

import statistics
import time

from pagedkv.config import Config, ceil_div


def decode_step_workload(
    cache_class, batch: int, prompt: int = 512, block_size: int = 16, steps: int = 4096
):
    """Returns (step function, cache). The pool has room for `steps` decode steps."""
    per_seq = ceil_div(prompt + steps + 1, block_size)
    cache = cache_class(
        Config(num_blocks=batch * per_seq + 16, block_size=block_size, store_kv=False)
    )
    shared = [(7 * i) % 1000 for i in range(prompt - 3)]  # a partial tail to fork
    seqs = []
    while len(seqs) < batch:
        seq, _ = cache.add_sequence(shared + [len(seqs)])
        cache.commit(seq)
        seqs.append(seq)
        if len(seqs) < batch:
            seqs.append(cache.fork(seq))
    length = [cache.sequence_length(seqs[0])]  # all sequences advance in lockstep

    def step():
        length[0] += 1
        cache.decode_step(seqs, [length[0] % 32000] * len(seqs))
        if length[0] % block_size == 0:  # every block_size steps, each new full block publishes
            for seq in seqs:
                cache.commit(seq)

    return step, cache


def pool_write_workload(
    pool_bytes: int,
    num_layers: int = 8,
    kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: str = "float16",
):
    """Returns (write one decode token into every layer and evaluate, cache)."""
    import mlx.core as mx

    from pagedkv.mlx_backend import PagedCache

    probe = Config(
        num_blocks=1,
        block_size=block_size,
        num_layers=num_layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
    )
    cache = PagedCache(
        Config(
            num_blocks=max(2, pool_bytes // probe.bytes_per_block),
            block_size=block_size,
            num_layers=num_layers,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=dtype,
        )
    )
    seq, _ = cache.add_sequence([1])
    mx_dtype = getattr(mx, dtype)
    rows = [mx.random.normal((1, kv_heads, head_dim)).astype(mx_dtype) for _ in range(num_layers)]
    mx.eval(rows)

    def write_token():
        for layer in range(num_layers):
            cache.write_kv(seq, layer, 0, rows[layer], rows[layer])
        mx.eval(cache.storage.keys, cache.storage.values)
        mx.synchronize()

    return write_token, cache


def pool_write_ratio(small_bytes: int, large_bytes: int, repeats: int = 100) -> dict[str, float]:
    """Median write-one-token time for both pools, measured alternately (A, B, A, B, ...) so that
    drift on a busy host hits both equally; returns both medians and large / small."""
    small, _ = pool_write_workload(small_bytes)
    large, _ = pool_write_workload(large_bytes)
    times: dict[str, list[float]] = {"small": [], "large": []}
    for i in range(repeats + 5):
        for name, fn in (("small", small), ("large", large)):
            start = time.perf_counter()
            fn()
            if i >= 5:  # the first rounds are warm-up
                times[name].append(time.perf_counter() - start)
    small_us = 1e6 * statistics.median(times["small"])
    large_us = 1e6 * statistics.median(times["large"])
    return {"small_us": small_us, "large_us": large_us, "ratio": large_us / small_us}
