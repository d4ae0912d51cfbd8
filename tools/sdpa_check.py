"""Is contiguous SDPA's time in `pagedkv bench gather` what it reads? Calls unchained and chained.

    python tools/sdpa_check.py [CONTEXTxBATCH,...]
    (default 1024x1,4096x1,4096x16,16384x16,32768x16)

Why: on the H100 of the fourteenth session the benchmark timed cuDNN at 16k x 16 at 276 us, which
is 3.9 TB/s of K/V, more than the 3.09 TB/s its own bandwidth probe read (docs/benchmarks.md
section 3). The suspect: the benchmark then issued its calls independently, and MLX's CUDA graph
may run independent calls at the same time; two calls reading the same K/V together share its
reads in the L2 (at 16k x 16 the cell's K/V is 1 GiB, so every call read the same copy).

Per cell, for contiguous SDPA (MLX's default path) and the paged kernel: microseconds per call
with many calls per synchronize, the calls independent (all on the cell's first query, as the
fourteenth session's benchmark did) and chained (each call's query the previous call's output, as
the benchmark now does: `pagedkv.benchmarks.gather.chained`), three times each; one call per
synchronize minus the same for a trivial op (minimum of 20); the host's share of a chained
call (building and submitting it, `mx.async_eval`); and the largest difference between
the two outputs on the same keys (a result that skipped keys would differ). And the read bandwidth
from a sum over 2 and 4 GiB. Needs a GPU; on the CPU it says so and exits 1.
"""

from __future__ import annotations

import argparse
import sys
import time

import mlx.core as mx

from pagedkv.benchmarks.gather import (
    cell_arrays,
    chained,
    cycling,
    kv_bytes,
    parse_cells,
    path_calls,
    per_call_us,
)
from pagedkv.mlx_backend.kernels import decode

DEFAULT_CELLS = "1024x1,4096x1,4096x16,16384x16,32768x16"
PATHS = {"contiguous": "SDPA", "kernel": "kernel"}


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
    data = mx.ones((gib, 2**30 // 2), mx.float16)  # 2-D: MLX sizes a dimension as int32
    mx.eval(data)
    seconds = per_call_us(lambda: mx.sum(data), max_calls=20) * 1e-6
    return data.nbytes / seconds / 1e12


def host_share_us(fn, calls: int = 200) -> tuple[float, float]:
    """Per call: host time to build and submit `calls` calls (`mx.async_eval` returns once the
    work is encoded), and the time until the GPU is done. Equal means the host is the bound."""
    for _ in range(3):
        mx.eval(fn())
    mx.synchronize()
    start = time.perf_counter()
    outs = [fn() for _ in range(calls)]
    mx.async_eval(outs)
    submitted = time.perf_counter() - start
    mx.synchronize()
    done = time.perf_counter() - start
    return 1e6 * submitted / calls, 1e6 * done / calls


def path_line(name: str, calls: list, query: mx.array, nbytes: int, floor: float) -> str:
    """One path on one cell: independent, chained and lone timings, in us and TB/s."""

    def text(times: list[float]) -> str:
        us = ", ".join(f"{t:.1f}" for t in times)
        return f"{us} us (= {', '.join(f'{nbytes / t / 1e6:.2f}' for t in times)} TB/s)"

    independent = [per_call_us(cycling([lambda c=c: c(query) for c in calls])) for _ in range(3)]
    linked = [per_call_us(chained(calls, query)) for _ in range(3)]
    alone = single_call_us(lambda: calls[0](query)) - floor
    host, done = host_share_us(chained(calls, query))
    return (
        f"  {name}: independent {text(independent)}; chained {text(linked)}; "
        f"one per sync {text([alone])} over the floor; chained, host build+submit "
        f"{host:.1f} of {done:.1f} us per call"
    )


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
        query = query[:, :, None, :]
        calls = path_calls(pools, dense, decode_batch)
        nbytes = kv_bytes(context, batch)
        outputs = [calls[path][0](query).astype(mx.float32) for path in PATHS]
        error = mx.max(mx.abs(outputs[0] - outputs[1])).item()
        print(
            f"ctx {context} batch {batch}: K/V {nbytes / 1e9:.3f} GB in {len(dense)} copies; "
            f"max |SDPA - kernel| {error:.2e}",
            flush=True,
        )
        for path, name in PATHS.items():
            print(path_line(name, calls[path], query, nbytes, floor), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
