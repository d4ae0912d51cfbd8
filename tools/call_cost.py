"""Host cost of building one decode attention call, per layer: the paged kernel's launch against
`mx.fast.scaled_dot_product_attention`, and one pool row write.

    python tools/call_cost.py

Llama-3-8B's attention shape at batch 1 and 2k context, bfloat16. Times graph building only (no
evaluation), 3000 calls each: what every layer of a decode step pays in Python and MLX's C++ before
the device sees anything. Needs a GPU with a kernel backend (the kernel object cannot be built on
the CPU).

The kernel is timed as shipped and with its splits merged the other way (in pass 1's launch, or
by a second kernel: `decode.ONE_LAUNCH`).
"""

from __future__ import annotations

import dataclasses
import timeit

import mlx.core as mx
import numpy as np

from pagedkv.mlx_backend.attention import decode_batch
from pagedkv.mlx_backend.kernels import decode

CALLS = 3000


def main() -> None:
    queries = mx.zeros((1, 32, 1, 128), mx.bfloat16)  # [B, q_heads, 1, head_dim]
    pool = mx.zeros((200, 16, 8, 128), mx.bfloat16)  # [blocks, block_size, kv_heads, head_dim]
    keys = mx.zeros((1, 8, 2048, 128), mx.bfloat16)  # [B, kv_heads, T, head_dim]
    mx.eval(queries, pool, keys)
    launch = decode.prepare(
        queries, pool, decode_batch([np.arange(129)], [2049], None), 0.088, False
    )
    mx.eval(launch(queries, pool, pool))  # compiled once, outside the timing
    row = queries[0, :8, 0][None]  # [1, kv_heads, head_dim]

    def per_call_us(fn) -> float:
        return timeit.timeit(fn, number=CALLS) / CALLS * 1e6

    kernel = per_call_us(lambda: launch(queries, pool, pool))
    other = dataclasses.replace(launch, one_launch=not launch.one_launch)  # the other merge
    mx.eval(other(queries, pool, pool))
    other_us = per_call_us(lambda: other(queries, pool, pool))
    sdpa = per_call_us(
        lambda: mx.fast.scaled_dot_product_attention(queries, keys, keys, scale=0.088)
    )
    write = per_call_us(lambda: pool.__setitem__((5, slice(3, 4)), row))
    print(
        f"graph building per call: kernel {kernel:.2f} us ({launch.splits} splits, one launch: "
        f"{launch.one_launch}; the other way {other_us:.2f} us), mx.fast.sdpa {sdpa:.2f} us, "
        f"pool row write {write:.2f} us"
    )


if __name__ == "__main__":
    print(f"MLX {mx.__version__} on {mx.default_device()}")
    main()
