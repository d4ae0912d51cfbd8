"""Does MLX update an array in place while earlier work that reads it is still running?

    python tools/donation.py [MB]

A pool-like array of MB megabytes (default 256) takes 10 one-row slice updates, each evaluated
before the next (`eval`), or scheduled with `mx.async_eval` while the previous one may still run
(`async`), or scheduled after a reader of the array (`async+reader`, as in a pipelined decode step:
the attention of step n reads the pool while step n+1's write is built). MLX writes in place only
when nothing else holds the array's buffer; work in flight holds its inputs, so a write scheduled
behind it copies the whole array. Milliseconds per update, per mode: near zero means in place.
"""

from __future__ import annotations

import sys
import time

import mlx.core as mx


def per_update_ms(megabytes: int, mode: str, updates: int = 10) -> float:
    pool = mx.zeros((megabytes * 2**20 // 4,), dtype=mx.float32)
    row = mx.ones((1,), dtype=mx.float32)
    mx.eval(pool)
    mx.synchronize()
    start = time.perf_counter()
    for i in range(updates):
        if mode == "async+reader":
            mx.async_eval(pool[:1024].sum())  # reads the pool as it is now
        pool[i : i + 1] = row
        if mode == "eval":
            mx.eval(pool)
        else:
            mx.async_eval(pool)
    mx.eval(pool)
    mx.synchronize()
    return 1e3 * (time.perf_counter() - start) / updates


def main(argv: list[str]) -> None:
    megabytes = int(argv[0]) if argv else 256
    if megabytes < 1:
        sys.exit("donation: MB is at least 1")
    print(
        f"MLX {mx.__version__} on {mx.default_device()}: {megabytes} MB array, 10 one-row updates"
    )
    for mode in ("eval", "async", "async+reader"):
        print(f"  {mode:13s} {per_update_ms(megabytes, mode):8.3f} ms per update")


if __name__ == "__main__":
    main(sys.argv[1:])
