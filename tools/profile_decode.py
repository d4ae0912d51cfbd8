"""Where a paged decode step's time goes, against mlx-lm's KVCache (run it on the GPU).

    python tools/profile_decode.py attention   # 32 layers of attention + K/V writes, GPU time
    python tools/profile_decode.py step        # one model step: host graph build vs evaluation

`attention`: Llama-3-8B layer shapes (32 q / 8 kv heads, d 128, bf16), context 2048; per step, 32
layers of (write one token's K/V, attend): mlx-lm's dense buffer + SDPA against the paged pool +
the fused kernel. Timed from a built graph to evaluated (the host's graph building excluded).
`step`: a 32-layer model too small for the GPU to matter, so the figures are host costs: the time
to build one decode step's graph (Python) and to evaluate it (MLX's per-node work + the GPU), for
mlx-lm's KVCache, the paged store with routed attention, and the paged store on gather. The paged
store schedules its pools at every write (`mx.async_eval`, for threads), so part of its evaluation
happens while the graph is built: compare build + evaluate. (On the CPU, scheduling executes.)
"""

from __future__ import annotations

import sys
import time

import mlx.core as mx
import numpy as np


def median_ms(step, runs: int = 20, split: bool = False):
    for _ in range(3):
        mx.eval(step())
    mx.synchronize()
    build, evaluate = [], []
    for _ in range(runs):
        start = time.perf_counter()
        out = step()
        built = time.perf_counter()
        mx.eval(out)
        mx.synchronize()
        build.append(built - start)
        evaluate.append(time.perf_counter() - built)
    med = lambda xs: 1e3 * sorted(xs)[len(xs) // 2]  # noqa: E731
    return (med(build), med(evaluate)) if split else med(evaluate)


def attention_steps(batch, layers=32, q_heads=32, kv_heads=8, dim=128, context=2048, block=16):
    """(dense step, paged step) for one batch size: each writes one token's K/V and attends."""
    from pagedkv.mlx_backend.kernels import decode

    q = mx.random.normal((batch, q_heads, 1, dim)).astype(mx.bfloat16)
    new = mx.random.normal((batch, kv_heads, 1, dim)).astype(mx.bfloat16)
    shape = (batch, kv_heads, context + 256, dim)
    dense = [[mx.zeros(shape, mx.bfloat16) for _ in range(2)] for _ in range(layers)]
    blocks = batch * (context // block + 8)
    pool_shape = (blocks, block, kv_heads, dim)
    pools = [[mx.zeros(pool_shape, mx.bfloat16) for _ in range(2)] for _ in range(layers)]
    tables = mx.array(np.arange(blocks, dtype=np.int32).reshape(batch, -1))
    bounds = mx.array(np.array([[0, context + 1]] * batch, np.int32))
    inputs = decode.DecodeBatch(tables, bounds, context + 1)
    rows = new.reshape(batch, kv_heads, dim)
    block_index = mx.array([context // block] * batch, mx.int32)
    row_index = mx.array([context % block] * batch, mx.int32)
    mx.eval(dense, pools, q, new, tables, bounds)

    def dense_step():
        outs = []
        for k, v in dense:
            k[..., context : context + 1, :] = new
            v[..., context : context + 1, :] = new
            visible = (k[..., : context + 1, :], v[..., : context + 1, :])
            outs.append(mx.fast.scaled_dot_product_attention(q, *visible, scale=dim**-0.5))
        return outs

    def paged_step():
        outs = []
        for k, v in pools:
            k[block_index, row_index] = rows
            v[block_index, row_index] = rows
            outs.append(decode.paged_decode(q, k, v, inputs, dim**-0.5))
        return outs

    return dense_step, paged_step


def attention() -> None:
    for batch in (1, 8):
        dense_step, paged_step = attention_steps(batch)
        print(
            f"batch {batch}: 32 layers of write + attention, GPU ms per step: "
            f"dense {median_ms(dense_step):.2f}, paged kernel {median_ms(paged_step):.2f}",
            flush=True,
        )


def step() -> None:
    from mlx_lm.models.cache import make_prompt_cache

    from pagedkv.mlx_lm import PagedKVStore
    from pagedkv.models import SMALL, random_model

    model = random_model(dict(SMALL, num_hidden_layers=32), dtype="bfloat16")
    prompt = list(range(64))
    token = mx.zeros((1, 1), mx.int32)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(prompt)[None], cache=cache))
    sides = [("mlx-lm KVCache", cache)]
    for route in (True, False):
        store = PagedKVStore.for_model(model, num_blocks=64, route_attention=route)
        session = store.open(prompt)
        mx.eval(model(mx.array(session.remaining_prompt)[None], cache=session.caches))
        sides.append((f"paged ({'routed' if route else 'gather'})", session.caches))
    for name, caches in sides:
        build, evaluate = median_ms(lambda c=caches: model(token, cache=c), split=True)
        print(f"{name}: build {build:.2f} ms, evaluate {evaluate:.2f} ms per step", flush=True)


if __name__ == "__main__":
    print(f"MLX {mx.__version__} on {mx.default_device()}")
    {"attention": attention, "step": step}[sys.argv[1] if len(sys.argv) > 1 else "step"]()
