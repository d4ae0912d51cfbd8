"""Does handing out splits as threadblocks free up close the batch-1 tail? An experiment.

    python tools/queue_probe.py [CELLS] [--splits 32,64,128] [--blocks 256] [--rounds N]
    e.g.  python tools/queue_probe.py 16384x1,32768x1,32768x16

At 32k x 1 the shipped pass 1's 256 threadblocks leave between 47.6 and 62.1 µs although their
work is equal (tools/block_clock.py on an H100; ADR 0002, eighteenth session). This builds
`tools/paged_decode_queue.cu`: the same tensor-core pass 1, run by `--blocks` persistent
threadblocks that take (split, row) items from a per-launch counter, each warp loading its next
item's first keys while it finishes the current one; the merge kernel is the shipped one. Its
output is the shipped split launch's at the same split count, bit for bit (checked per cell).
Per cell (`pagedkv bench gather`'s: float16, head_dim 128, 32 query / 8 kv heads, block 16,
scattered ids; calls chained, each on its own K/V copy) and per split count, timed in turn
`--rounds` times (medians): cuDNN, the shipped kernel at its rule's count, the shipped kernel
at the count, and the queue. Needs a CUDA GPU with tensor cores (sm_80+); elsewhere it says so
and exits 1. Not part of the package: if it pays, it moves into kernels/ with the GPU suite's
tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import cache
from pathlib import Path

from pagedkv.benchmarks.gather import cell_arrays, chained, in_turn, parse_cells, path_calls
from pagedkv.mlx_backend.kernels import decode, source

QUEUE_SOURCE = Path(__file__).with_name("paged_decode_queue.cu")


def shipped_lines(name: str) -> str:
    """The shipped tensor-core pass 1's lines between `// NAME` and `// end NAME`
    (paged_decode_mma.cu), compacted as the shipped source is."""
    text = source.FILES["cuda_mma"].read_text()
    start = text.index("\n", text.index(f"  // {name}:")) + 1
    return source._compact(text[start : text.index(f"  // end {name}")].splitlines())


def queue_body() -> str:
    """The experiment's body with the shipped lines at `queries`, `group`, `sums` and `stores` and the
    shipped in-block merge and split epilogue at `epilogue`."""
    text = QUEUE_SOURCE.read_text()
    start = text.index("  constexpr int NJ")  # past the file's comment
    for name in ("queries", "group", "sums", "stores"):
        text = text.replace(f"//// {name}\n", shipped_lines(name))
    shared = source.sections("cuda")
    return text[start:].replace("//// epilogue\n", shared["merge"] + shared["split"])


@cache
def queue_kernel(shape: decode.Shape):
    import mlx.core as mx

    template = decode.pass1_template(shape)
    return mx.fast.cuda_kernel(
        name="queue_probe_" + shape.name("split"),
        input_names=[
            "queries",
            "k_pool",
            "v_pool",
            "tables",
            "bounds",
            "scale",
            "sinks",
            "counter",
            "items",
        ],  # fmt: skip
        output_names=["o_acc", "o_ml"],
        source=decode.cuda_constants(template) + queue_body(),
        header=source.sections("cuda_mma")["header"],
    )


def queue_launch(query, k_pool, batch, scale: float, splits: int, blocks: int):
    """q, k_pool, v_pool -> the queue form's output (its shape as the query's), for a cell."""
    import mlx.core as mx

    launch = decode.prepare(query, k_pool, batch, scale, False, splits, "cuda")
    shape = launch.plan.shape
    if not shape.tensor_cores:
        raise ValueError("the queue form is written for the tensor-core pass 1 only")
    kernel = queue_kernel(shape)
    rows, heads_grid = query.shape[0], launch.plan.heads_grid
    total = splits * heads_grid * rows
    items = mx.array([splits, heads_grid, total], dtype=mx.int32)
    tables, bounds, scale_arr = launch.step_inputs
    sinks = mx.array([0.0], dtype=mx.float32)

    def call(q, k, v):
        q_heads, head_dim = q.shape[1], q.shape[-1]
        partials = [(rows * q_heads, splits, head_dim), (rows * q_heads, splits, 2)]
        o_acc, o_ml = kernel(
            inputs=[q, k, v, tables, bounds, scale_arr, sinks, decode.zero_counters(1), items],
            grid=(min(blocks, total) * decode.THREADS, 1, 1),
            threadgroup=(decode.THREADS, 1, 1),
            output_shapes=partials, output_dtypes=[mx.float32, mx.float32],
        )  # fmt: skip
        (out,) = launch.plan.reduce(
            inputs=[o_acc, o_ml, sinks], grid=(rows * q_heads * decode.THREADS, 1, 1),
            threadgroup=(decode.THREADS, 1, 1), output_shapes=[q.shape], output_dtypes=[q.dtype],
        )  # fmt: skip
        return out

    return call


def run_cell(context: int, batch: int, splits: list[int], blocks: int, rounds: int) -> None:
    import mlx.core as mx

    query, pools, dense, dbatch = cell_arrays(context, batch, 16)
    q4 = query[:, :, None, :]
    scale = query.shape[-1] ** -0.5
    paths = path_calls(pools, dense, dbatch)
    chains = {"cudnn": paths["contiguous"], "rule": paths["kernel"]}
    for count in splits:
        shipped = decode.prepare(q4, pools[0][0], dbatch, scale, False, count)
        queue = queue_launch(q4, pools[0][0], dbatch, scale, count, blocks)
        want, got = shipped(q4, *pools[0]), queue(q4, *pools[0])
        if not mx.array_equal(want, got).item():
            raise SystemExit(f"queue_probe: the queue form differs at {count} splits")
        chains[f"s{count}"] = [lambda q, k=k, v=v, f=shipped: f(q, k, v) for k, v in pools]
        chains[f"q{count}"] = [lambda q, k=k, v=v, f=queue: f(q, k, v) for k, v in pools]
    times = in_turn({name: chained(calls, q4) for name, calls in chains.items()}, rounds)
    us = {name: statistics.median(v) for name, v in times.items()}
    text = ", ".join(f"{n} {v:.1f} ({v / us['cudnn']:.2f}x)" for n, v in us.items())
    print(
        f"ctx {context} batch {batch} ({blocks} queue threadblocks; s = shipped, q = queue at "
        f"that split count; outputs equal bit for bit): {text} us",
        flush=True,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="?", default="16384x1,32768x1,32768x16")
    parser.add_argument("--splits", default="32,64,128")
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        cells = parse_cells(args.cells)
        splits = [int(s) for s in args.splits.split(",")]
        if not all(1 < s <= decode.MAX_SPLITS for s in splits) or args.blocks < 1:
            raise ValueError
        if args.rounds < 1:
            raise ValueError
    except ValueError:
        parser.error(
            f"cells are CONTEXTxBATCH, --splits in [2, {decode.MAX_SPLITS}], --blocks and "
            f"--rounds >= 1; got {argv}"
        )
    if decode.backend() != "cuda" or decode.cuda_arch() < 80:
        print("queue_probe: needs a CUDA GPU with tensor cores (sm_80 or later)")
        return 1
    for context, batch in cells:
        run_cell(context, batch, splits, args.blocks, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
