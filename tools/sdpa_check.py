"""Is contiguous SDPA's time in `pagedkv bench gather` what it reads? One cell's cuDNN figure checked.

    python tools/sdpa_check.py [CONTEXTxBATCH,...]     (default 4096x16,16384x16,32768x16)

Why: on the H100 of the fourteenth session the benchmark timed cuDNN at 16k x 16 at 276 us, which
is 3.9 TB/s of K/V, more than the 3.09 TB/s its own bandwidth probe read (docs/benchmarks.md
section 3). Per cell this prints contiguous SDPA (MLX's default path) timed three ways: the
benchmark's (many calls per synchronize, `per_call_us`), repeated three times; one call per
synchronize, minus the same for a trivial op (minimum of 20); and the largest difference between
its output and the paged kernel's on the same keys (a result that skipped keys would differ). And
the read bandwidth from a sum over 2 and 4 GiB. Needs a GPU; on the CPU it says so and exits 1.
"""

from __future__ import annotations

import argparse
import sys
import time

import mlx.core as mx

from pagedkv.benchmarks.gather import (
    HEAD_DIM,
    cell_arrays,
    cycling,
    kv_bytes,
    parse_cells,
    per_call_us,
    sdpa_calls,
)
from pagedkv.mlx_backend.kernels import decode

DEFAULT_CELLS = "4096x16,16384x16,32768x16"


def single_call_us(fn, rounds: int = 20) -> float:
    """Fastest of `rounds` calls, each evaluated and synchronized alone."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        best = min(best, time.perf_counter() - start)
    return 1e6 * best


def sum_tb_s(gib: int) -> float:
    data = mx.ones((gib * 2**30 // 2,), mx.float16)
    mx.eval(data)
    seconds = per_call_us(lambda: mx.sum(data), max_calls=20) * 1e-6
    return data.nbytes / seconds / 1e12


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="?", default=DEFAULT_CELLS, help="CONTEXTxBATCH,...")
    args = parser.parse_args(argv)
    try:
        cells = parse_cells(args.cells)
    except ValueError as error:
        parser.error(str(error))
    if decode.backend() is None:
        print("sdpa_check: the default device has no kernel backend (CUDA or Metal GPU)")
        return 1
    print(f"MLX {mx.__version__} on {mx.default_device()}")
    print(
        f"read bandwidth: sum over 2 GiB {sum_tb_s(2):.2f} TB/s, over 4 GiB {sum_tb_s(4):.2f} TB/s"
    )
    scalar = mx.array(1.0)
    mx.eval(scalar)
    floor = single_call_us(lambda: scalar + 1)
    print(f"one trivial op per synchronize: {floor:.1f} us")
    for context, batch in cells:
        query, pools, dense, decode_batch = cell_arrays(context, batch, 16)
        sdpa = sdpa_calls(query, dense)
        nbytes = kv_bytes(context, batch)
        many = [per_call_us(cycling(sdpa)) for _ in range(3)]
        alone = single_call_us(sdpa[0]) - floor
        paged = decode.paged_decode(query, *pools[0], decode_batch, HEAD_DIM**-0.5)
        dense_out = sdpa[0]().reshape(paged.shape)
        error = mx.max(mx.abs(dense_out.astype(mx.float32) - paged.astype(mx.float32))).item()
        print(
            f"ctx {context} batch {batch}: K/V {nbytes / 1e9:.3f} GB in {len(dense)} copies; "
            f"SDPA many per sync {', '.join(f'{t:.1f}' for t in many)} us "
            f"(= {', '.join(f'{nbytes / t / 1e6:.2f}' for t in many)} TB/s); one per sync "
            f"{alone:.1f} us over the floor (= {nbytes / alone / 1e6:.2f} TB/s); "
            f"max |SDPA - kernel| {error:.2e}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
