"""When does each threadblock of the paged decode kernel start and finish? A GPU-clock timeline.

    python tools/block_clock.py [CELLS] [--calls N] [--splits S] [--ordered] [--views]
    e.g.  python tools/block_clock.py 32768x1,16384x1,32768x16

At batch 1 from 16k context the kernel's pass 1 takes longer than cuDNN's on the same grid
(Nsight Compute on the H100: 32k x 1, 256 threadblocks of 128 threads each, 69.0 against 57.8 µs)
although it streams as fast as cuDNN at batch 16. This tool tells where the time of a batch-1
call goes: it builds the tensor-core pass 1 with its split epilogue (the shipped source,
`paged_decode_mma.cu` + `paged_decode.cu`) with three stamps of the GPU's global timer
(`%globaltimer_lo`, ns) per threadblock: at entry, after all its warps left the key loop (the
first barrier), and after its partials are written; with the SM it ran on. Calls are chained and
each reads its own copy of the cell's K/V, as `pagedkv bench gather` times them, and the merge
kernel runs between them as in the shipped two-launch form. Per cell it prints, over the calls
after the first: the span of pass 1 (first entry to last exit), the spread of entries, the
loop's end and the exits (percentiles from the call's first entry), per-block time, and the
gap from one call's last exit to the next call's first entry (the merge kernel and two launch
gaps). `--ordered` gives every sequence consecutive block ids (the K/V of a head then lies as
cuDNN reads it, in order), to compare with the scattered ids of the benchmark. `--views` hands
the pools over as one-element views of their buffers (`decode.POOL_VIEWS`): with many `--calls`
the average from one call's first entry to the next shows whether the GPU still waits between
calls (MLX ends its CUDA graph by the inputs' counted size; ADR 0002, eighteenth session).
Needs a CUDA GPU with tensor cores (sm_80+); elsewhere it says so and exits 1. The timer's
resolution is the GPU's (1 µs on some GPUs, finer under a profiler); the figures are µs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from pagedkv.benchmarks.gather import cell_arrays, parse_cells
from pagedkv.mlx_backend.kernels import decode, source

STAMP = 'unsigned int {0}; asm volatile("mov.u32 %0, %%globaltimer_lo;" : "=r"({0}));\n'
EXIT = (
    "__syncthreads();\n"
    "if (threadIdx.x == 0) {\n" + STAMP.format("pkv_c2") + "unsigned int pkv_sm;\n"
    'asm volatile("mov.u32 %0, %%smid;" : "=r"(pkv_sm));\n'
    "const size_t pkv_at = 4 * (((size_t)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x"
    " + blockIdx.x);\n"
    "stamps[pkv_at] = pkv_c0; stamps[pkv_at + 1] = pkv_c1; stamps[pkv_at + 2] = pkv_c2;"
    " stamps[pkv_at + 3] = pkv_sm;\n}\n"
)


def clocked_body() -> str:
    """The shipped split pass 1 with the three stamps: entry, after the loop's barrier, exit."""
    partial = source.sections("cuda_mma")["partial"]
    shared = source.sections("cuda")
    return (
        STAMP.format("pkv_c0") + partial + STAMP.format("pkv_c1") + shared["merge"]
        + shared["split"] + EXIT
    )  # fmt: skip


def clocked_call(query, k_pool, batch, scale):
    """(launch, kernel): the rule's launch for this cell and the clocked pass 1 for its shape."""
    import mlx.core as mx

    launch = decode.prepare(query, k_pool, batch, scale, False, backend_name="cuda")
    shape = launch.plan.shape
    if not shape.tensor_cores:
        raise SystemExit("block_clock: this GPU or shape does not run the tensor-core pass 1")
    template = decode.pass1_template(shape)
    kernel = mx.fast.cuda_kernel(
        name="block_clock_" + shape.name("split"),
        input_names=["queries", "k_pool", "v_pool", "tables", "bounds", "scale", "sinks"],
        output_names=["o_acc", "o_ml", "stamps"],
        source=decode.cuda_constants(template) + clocked_body(),
        header=source.sections("cuda_mma")["header"],
    )
    return launch, kernel


def tail_report(stamps: list, rel: list) -> str:
    """Is a late threadblock late because of where it ran? Per call, each SM's last exit; the
    mean correlation of those between consecutive calls (near 1: the same SMs are late every
    call, a placement effect; near 0: which ones is chance, as memory serves them), and the
    median exit of threadblocks that had their SM to themselves against those that shared one."""
    correlations, alone, shared, previous = [], [], [], None
    for s, r in zip(stamps[1:], rel[1:]):
        sm = s[:, 3]
        late = {int(i): r[sm == i, 2].max() for i in np.unique(sm)}
        for i, n in zip(*np.unique(sm, return_counts=True)):
            (alone if n == 1 else shared).extend(r[sm == i, 2].tolist())
        if previous is not None:
            common = sorted(set(late) & set(previous))
            if len(common) > 2:
                a = np.array([late[i] for i in common])
                b = np.array([previous[i] for i in common])
                if a.std() > 0 and b.std() > 0:
                    correlations.append(float(np.corrcoef(a, b)[0, 1]))
        previous = late
    corr = f"{np.mean(correlations):.2f}" if correlations else "n/a"
    sides = (
        f"exit median alone on an SM {np.median(alone):.1f} us ({len(alone)}), sharing one "
        f"{np.median(shared):.1f} us ({len(shared)})"
        if alone and shared
        else "every SM ran as many threadblocks"
    )
    return f"   SMs' last exits, correlation between consecutive calls {corr}; {sides}"


def run_cell(
    context: int, batch: int, calls: int, splits: int | None, ordered: bool, views: bool
) -> None:
    import mlx.core as mx

    query, pools, _, dbatch = cell_arrays(context, batch, 16, dtype=mx.bfloat16)
    if ordered:
        per_seq = dbatch.tables.shape[1]
        tables = mx.arange(batch * per_seq, dtype=mx.int32).reshape(batch, per_seq)
        dbatch = decode.DecodeBatch(tables, dbatch.bounds, dbatch.longest)
    scale = query.shape[-1] ** -0.5
    launch, kernel = clocked_call(query, pools[0][0], dbatch, scale)
    if splits is not None:
        launch = decode.prepare(query, pools[0][0], dbatch, scale, False, splits, "cuda")
    if launch.splits < 2:
        print(f"ctx {context} batch {batch}: one pass (no split epilogue to clock); skipped")
        return
    rows, q_heads, head_dim = query.shape
    blocks = launch.grid[0] // decode.THREADS * launch.grid[1] * launch.grid[2]
    tables, bounds, scale_arr = launch.step_inputs
    sinks = mx.array([0.0], dtype=mx.float32)
    partials = [(rows * q_heads, launch.splits, head_dim), (rows * q_heads, launch.splits, 2)]

    def one_call(q, k_pool, v_pool):
        if views:  # decode.POOL_VIEWS: one element each for MLX to count
            k_pool, v_pool = decode.pool_view(k_pool), decode.pool_view(v_pool)
        o_acc, o_ml, stamps = kernel(
            inputs=[q, k_pool, v_pool, tables, bounds, scale_arr, sinks],
            grid=launch.grid, threadgroup=(decode.THREADS, 1, 1),
            output_shapes=partials + [(blocks, 4)],
            output_dtypes=[mx.float32, mx.float32, mx.uint32],
        )  # fmt: skip
        (out,) = launch.plan.reduce(
            inputs=[o_acc, o_ml, sinks], grid=(rows * q_heads * decode.THREADS, 1, 1),
            threadgroup=(decode.THREADS, 1, 1), output_shapes=[query.shape],
            output_dtypes=[query.dtype],
        )  # fmt: skip
        return out, stamps

    def chain():
        q, stamps = query, []
        for i in range(calls):
            q, s = one_call(q, *pools[i % len(pools)])
            stamps.append(s)
        mx.eval(q, *stamps)
        mx.synchronize()
        return [np.array(s).astype(np.int64) for s in stamps]

    chain()  # compile and warm up
    began = time.perf_counter()
    stamps = chain()
    wall_us = (time.perf_counter() - began) / calls * 1e6
    timeline_us = ((stamps[-1][:, 0].min() - stamps[0][:, 0].min()) % 2**32) / 1e3 / (calls - 1)
    entry = [s[:, 0] for s in stamps]
    rel = [(s[:, :3] - s[:, :1].min()) % 2**32 / 1e3 for s in stamps]  # µs from the call's start
    span, spread, loop50, loop_max, exit50, exit_max, per_block, gaps = ([] for _ in range(8))
    for i in range(1, calls):
        r = rel[i]
        span.append(r[:, 2].max())
        spread.append(r[:, 0].max())
        loop50.append(np.median(r[:, 1]))
        loop_max.append(r[:, 1].max())
        exit50.append(np.median(r[:, 2]))
        exit_max.append(r[:, 2].max())
        per_block.append(np.median(r[:, 2] - r[:, 0]))
        last_exit = stamps[i - 1][:, 2].max()
        gaps.append(((entry[i].min() - last_exit) % 2**32) / 1e3)
    sms = len(set(stamps[-1][:, 3].tolist()))

    def med(values):
        return f"{statistics.median(values):6.1f}"

    print(
        f"ctx {context} batch {batch} ({launch.splits} splits, {blocks} blocks on {sms} SMs"
        f"{', ordered ids' if ordered else ''}{', pools as views' if views else ''}): pass 1 span {med(span)} us; entries within "
        f"{med(spread)}; loop done median {med(loop50)} last {med(loop_max)}; exit median "
        f"{med(exit50)} last {med(exit_max)}; per block median {med(per_block)}; gap to next "
        f"call {med(gaps)} us (medians over {calls - 1} calls); from one call's first entry to "
        f"the next {timeline_us:.1f} us on average, wall time {wall_us:.1f} us per call",
        flush=True,
    )
    print(tail_report(stamps, rel))
    last = rel[-1]
    order = np.sort(last[:, 2])
    deciles = ", ".join(f"{order[int(q * (len(order) - 1))]:.1f}" for q in np.linspace(0, 1, 11))
    print(f"   last call's exits, deciles from its first entry (us): {deciles}")
    starts = np.sort(last[:, 0])
    deciles = ", ".join(f"{starts[int(q * (len(starts) - 1))]:.1f}" for q in np.linspace(0, 1, 11))
    print(f"   last call's entries, deciles (us): {deciles}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="?", default="32768x1,16384x1,32768x16")
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--splits", type=int, default=None)
    parser.add_argument("--ordered", action="store_true")
    parser.add_argument("--views", action="store_true")
    args = parser.parse_args(argv)
    try:
        cells = parse_cells(args.cells)
        if args.calls < 2 or (args.splits is not None and args.splits < 2):
            raise ValueError
    except ValueError:
        parser.error(f"cells are CONTEXTxBATCH, --calls >= 2, --splits >= 2; got {argv}")
    if decode.backend() != "cuda" or decode.cuda_arch() < 80:
        print("block_clock: needs a CUDA GPU with tensor cores (sm_80 or later)")
        return 1
    for context, batch in cells:
        run_cell(context, batch, args.calls, args.splits, args.ordered, args.views)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
