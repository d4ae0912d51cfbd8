"""What passing template arguments costs per kernel call, against the same variant with its values
declared in the source (how the CUDA variants are built: `decode.cuda_constants`).

    python tools/template_cost.py

Llama-3-8B's attention shape at batch 1 and 2k context, bfloat16, one pass. Both kernel objects
hold the same code; the templated one gets the values as MLX template arguments at every call, as
the kernels did before. Prints, per call, the host time to build it (3000 calls) and to encode and
run it (200 calls per evaluation), and checks the outputs are equal. CUDA only.
"""

from __future__ import annotations

import time
import timeit

import mlx.core as mx
import numpy as np

from pagedkv.mlx_backend.attention import decode_batch
from pagedkv.mlx_backend.kernels import decode

CALLS = 3000


def per_call_us(fn, calls: int = 200) -> tuple[float, float]:
    """(building, evaluating) microseconds per call, `calls` calls per evaluation."""
    mx.eval([fn() for _ in range(calls)])
    mx.synchronize()
    start = time.perf_counter()
    outputs = [fn() for _ in range(calls)]
    built = time.perf_counter()
    mx.eval(outputs)
    mx.synchronize()
    done = time.perf_counter()
    return (built - start) / calls * 1e6, (done - built) / calls * 1e6


def main() -> None:
    queries = mx.zeros((1, 32, 1, 128), mx.bfloat16)  # [B, q_heads, 1, head_dim]
    pool = mx.random.normal((200, 16, 8, 128)).astype(mx.bfloat16)  # [blocks, 16, kv, dim]
    mx.eval(queries, pool)
    batch = decode_batch([np.arange(129)], [2049], None)
    # Both objects hold paged_decode.cu (the tensor-core pass 1 has no template form to compare),
    # in one pass: the templated call below launches the `final` kernel.
    decode.cuda_arch = lambda: 0
    decode._PLANS.clear()
    baked = decode.prepare(queries, pool, batch, 0.088, False, num_splits=1, backend_name="cuda")
    shape = baked.plan.shape
    template = [
        ("TQ", shape.query_dtype), ("D", shape.head_dim), ("BS", shape.block_size),
        ("KVH", shape.kv_heads), ("G", shape.group), ("QT", shape.query_tile),
        ("L", shape.lanes), ("U", shape.unroll), ("KIND", decode.POOL_KIND[shape.pool_dtype]),
        ("HAS_SINKS", shape.has_sinks),
    ]  # fmt: skip
    kernel = decode._kernel("cuda", shape.name("final") + "_templated_probe", "final")
    inputs = [queries, pool, pool, *baked.step_inputs, decode._scalar(0.0)]

    def templated() -> mx.array:
        return kernel(
            inputs=inputs, template=template, grid=baked.grid, threadgroup=(decode.THREADS, 1, 1),
            output_shapes=[baked.queries_shape], output_dtypes=[mx.bfloat16],
        )[0]  # fmt: skip

    def declared() -> mx.array:
        return baked(queries, pool, pool)

    same = mx.array_equal(templated(), declared()).item()
    for name, fn in (("template arguments", templated), ("values in the source", declared)):
        build = timeit.timeit(fn, number=CALLS) / CALLS * 1e6
        _, evaluate = per_call_us(fn)
        print(f"{name:22s} build {build:5.2f} us  encode+run {evaluate:5.2f} us per call")
    print(f"same output: {same}")


if __name__ == "__main__":
    print(f"MLX {mx.__version__} on {mx.default_device()}")
    main()
