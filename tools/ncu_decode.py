"""GPU time of one decode-attention call, from Nsight Compute: the paged kernel against cuDNN.

    python tools/ncu_decode.py [CELLS] [--splits 8,16] [--variants U4QT4,U2QT4L8] [--csv PATH]
                               [--details]
    e.g.  python tools/ncu_decode.py 2048x1,32768x16 --splits 8,16,64

The per-call timings of `pagedkv bench gather` and `tools/split_sweep.py` are host-bound for
small cells (a custom-kernel call costs more host time than the GPU work of a batch-1 row), so they
cannot rank kernel variants there; this tool reads the GPU's own kernel durations. It runs itself
under `ncu --cache-control all --clock-control none` (cold caches, boost clocks) and, per cell
(context x batch; bfloat16, head_dim 128, 32 query / 8 kv heads, block 16, scattered block ids):
contiguous SDPA (MLX's default path: cuDNN on CUDA) and the shipped code at the rule's split count
and at each forced count (on sm_80+ GPUs that is the tensor-core pass 1, `paged_decode_mma.cu`),
then, with `--variants`, the one-lane-per-chunk kernel (`paged_decode.cu`) at other keys in
flight `U`, query tiles `QT` and lanes per key row `L`. A tiny marker kernel,
launched before each measured call with its index as the grid size, attributes every kernel ncu
records (split + merge, cuDNN's two) to its call; three repetitions, median of each call's summed
durations. With `--details`, one repetition and, instead of durations, ncu's own report of
every kernel (speed of light, memory workload, occupancy, warp states and scheduler statistics:
why a kernel is as fast as it is), each call's kernels after the marker carrying its index.
Needs a CUDA GPU with `ncu` on PATH (not Metal); elsewhere it says so and exits 1.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

from pagedkv.benchmarks.gather import HEAD_DIM, cell_arrays, parse_cells

BLOCK = 16  # the cells' other sizes are pagedkv bench gather's: 32 query / 8 kv heads, d 128
SCALE = HEAD_DIM**-0.5
REPEATS = 3
DEFAULT_CELLS = "2048x1,8192x1,32768x1,2048x4,32768x16"
MARKER = "ncu_decode_marker"


def parse_variants(text: str) -> list[tuple[int, int, int | None]]:
    """'U4QT4,U2QT1L8' -> [(4, 4, None), (2, 1, 8)]: keys in flight per lane group (1-8), query
    heads per threadblock (a divisor of the cells' 4 query heads per kv head), lanes per key row
    (4, 8, 16 or 32; None: the shipped shape's)."""
    variants = []
    for item in text.split(","):
        match = re.fullmatch(r"U([1-8])QT([124])(?:L(4|8|16|32))?", item)
        if not match:
            raise ValueError(f"a variant is U<1-8>QT<1|2|4>[L<4|8|16|32>], got {item!r}")
        variants.append((int(match[1]), int(match[2]), int(match[3]) if match[3] else None))
    return variants


def kernel_rows(rows: list[list[str]]):
    """ncu's raw CSV rows -> (kernel name, grid size, duration in µs) per profiled kernel, in
    launch order (ncu's own messages skipped)."""
    start = next(i for i, row in enumerate(rows) if "Kernel Name" in row)
    header, units = rows[start], rows[start + 1]
    name, grid = header.index("Kernel Name"), header.index("Grid Size")
    duration = header.index("gpu__time_duration.sum")
    to_us = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
    scale = to_us[units[duration]]
    for row in rows[start + 2 :]:
        if len(row) > duration:
            yield row[name], row[grid], float(row[duration].replace(",", "")) * scale


def marker_index(grid: str) -> int:
    """The call index a marker kernel carries as its grid size ("(3, 1, 1)" -> 3)."""
    return int(re.findall(r"\d+", grid)[0])


def durations_by_call(rows: list[list[str]], calls: int) -> dict[int, float]:
    """ncu's raw CSV rows -> {call index (1-based): median over repetitions of the summed
    durations (µs) of the kernels launched between that call's marker and the next marker}."""
    sums: dict[int, list[float]] = {}
    current = None
    for kernel, grid, us in kernel_rows(rows):
        if MARKER in kernel:
            current = marker_index(grid)
            sums.setdefault(current, []).append(0.0)
        elif current is not None:
            sums[current][-1] += us
    return {i: statistics.median(sums[i]) for i in range(1, calls + 1) if i in sums}


def split_counts(context: int, rule: int, forced: list[int]) -> list[int]:
    """The split counts a kernel is timed at in one cell: its rule's and each forced count that
    the cell's blocks allow (at most one split per block, MAX_SPLITS)."""
    blocks = -(-context // BLOCK)
    return sorted({rule, *(n for n in forced if n <= min(blocks, 256))})


def variant_call(unroll: int, tile: int, lanes: int | None):
    """The shipped kernel with `U`, `QT` (and `L`) replaced, called as `Launch.__call__` calls
    it: one pass for one split, else split partials and the shipped merge kernel."""
    import mlx.core as mx

    from pagedkv.mlx_backend.kernels import decode, source

    parts = source.sections("cuda")
    built: dict = {}

    def call(query, k_pool, v_pool, batch, scale, splits):
        plan = decode.plan_for(query, k_pool, False, "cuda")
        shape = plan.shape
        if shape not in built:
            template = [
                ("TQ", shape.query_dtype), ("D", shape.head_dim), ("BS", shape.block_size),
                ("KVH", shape.kv_heads), ("G", shape.group), ("QT", tile),
                ("L", lanes or shape.lanes),
                ("U", unroll), ("KIND", decode.POOL_KIND[shape.pool_dtype]), ("HAS_SINKS", False),
            ]  # fmt: skip
            constants = decode.cuda_constants(template)
            built[shape] = {  # one pass (normalised output) and split partials, as shipped
                part: mx.fast.cuda_kernel(
                    name=f"ncu_decode_u{unroll}_qt{tile}_l{lanes}_{shape.name(part)}",
                    input_names=[
                        "queries",
                        "k_pool",
                        "v_pool",
                        "tables",
                        "bounds",
                        "scale",
                        "sinks",
                    ],
                    output_names=outputs,
                    source=constants + source.pass1_body("cuda", split=part == "split"),
                    header=parts["header"],
                )
                for part, outputs in (("final", ["out"]), ("split", ["o_acc", "o_ml"]))
            }
        rows, heads = query.shape[0], query.shape[1]
        sinks = mx.array([0.0])
        inputs = [query, k_pool, v_pool, batch.tables, batch.bounds, mx.array([scale]), sinks]
        grid = (splits * decode.THREADS, shape.kv_heads * (shape.group // tile), rows)
        if splits == 1:
            (out,) = built[shape]["final"](
                inputs=inputs, grid=grid, threadgroup=(decode.THREADS, 1, 1),
                output_shapes=[query.shape], output_dtypes=[query.dtype],
            )  # fmt: skip
            return out
        o_acc, o_ml = built[shape]["split"](
            inputs=inputs, grid=grid, threadgroup=(decode.THREADS, 1, 1),
            output_shapes=[(rows * heads, splits, HEAD_DIM), (rows * heads, splits, 2)],
            output_dtypes=[mx.float32, mx.float32],
        )  # fmt: skip
        (out,) = plan.reduce(
            inputs=[o_acc, o_ml, sinks], template=plan.reduce_template,
            grid=(rows * heads * decode.THREADS, 1, 1), threadgroup=(decode.THREADS, 1, 1),
            output_shapes=[query.shape], output_dtypes=[query.dtype],
        )  # fmt: skip
        return out

    return call


DETAIL_SECTIONS = (
    "SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "WarpStateStats", "SchedulerStats",
    "LaunchStats",
)  # fmt: skip


def child(cells, splits, variants, labels_path: str, repeats: int = REPEATS) -> None:
    """Under ncu: build every call, compile it, then profile `repeats` rounds of marked calls."""
    import ctypes

    import mlx.core as mx

    from pagedkv.mlx_backend.kernels import decode

    marker = mx.fast.cuda_kernel(
        name=MARKER, input_names=["x"], output_names=["y"], source="y[0] = x[0];"
    )
    one = mx.zeros((1,))
    calls = []
    for context, batch in cells:
        query, pools, dense, decode_batch = cell_arrays(context, batch, BLOCK, mx.bfloat16, 1)
        (k_pool, v_pool), (dense_k, dense_v) = pools[0], dense[0]  # ncu flushes the caches itself
        launch = decode.prepare(query, k_pool, decode_batch, SCALE, False)
        rule = launch.splits
        # The variants are the other kernel, whose rule aims at its own wave (split_count).
        simt = dataclasses.replace(launch.plan.shape, tensor_cores=False)
        variant_rule = decode.split_count(simt, batch, decode_batch.longest)
        q4 = query[:, :, None, :]
        calls.append(
            (
                f"{context}x{batch} sdpa",
                lambda q4=q4, k=dense_k, v=dense_v: mx.fast.scaled_dot_product_attention(
                    q4, k, v, scale=SCALE
                ),
            )
        )
        counts = split_counts(context, rule, splits)
        for count in counts:  # the shipped code (on sm_80+ its tensor-core pass 1 for bfloat16)
            label = f"{context}x{batch} shipped s{count}{'*' if count == rule else ''}"
            args = (query, k_pool, v_pool, decode_batch, SCALE)
            calls.append((label, lambda a=args, n=count: decode.paged_decode(*a, num_splits=n)))
        for unroll, tile, lanes in variants:
            fn = variant_call(unroll, tile, lanes)
            name = f"U{unroll}QT{tile}" + (f"L{lanes}" if lanes else "")
            for count in split_counts(context, variant_rule, splits):
                label = f"{context}x{batch} {name} s{count}{'*' if count == variant_rule else ''}"
                calls.append(
                    (
                        label,
                        lambda fn=fn, a=(query, k_pool, v_pool, decode_batch, SCALE, count): fn(*a),
                    )
                )
    for _, fn in calls:  # compile and warm up outside the profiled range
        mx.eval(fn())
    mx.synchronize()
    driver = ctypes.CDLL("libcuda.so.1")
    driver.cuProfilerStart()
    for _ in range(repeats):
        for index, (_, fn) in enumerate(calls, 1):
            mx.eval(marker(inputs=[one], grid=(index, 1, 1), threadgroup=(1, 1, 1),
                           output_shapes=[(1,)], output_dtypes=[mx.float32])[0])  # fmt: skip
            mx.eval(fn())
    mx.synchronize()
    driver.cuProfilerStop()
    with open(labels_path, "w") as f:
        json.dump([label for label, _ in calls], f)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="?", default=DEFAULT_CELLS, help="CONTEXTxBATCH,...")
    parser.add_argument("--splits", default="8,16,64", help="forced split counts, 1..256")
    parser.add_argument(
        "--variants", default=None, help="U<n>QT<n>[L<n>],...: paged_decode.cu at these values"
    )
    parser.add_argument("--csv", default=None, help="also write label,us rows here")
    parser.add_argument(
        "--details", action="store_true", help="ncu's per-kernel report instead of durations"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        cells = parse_cells(args.cells)
        splits = [int(s) for s in args.splits.split(",") if s.isdigit() and 1 <= int(s) <= 256]
        if len(splits) != len(args.splits.split(",")):
            raise ValueError(f"split counts are integers in [1, 256], got {args.splits!r}")
        variants = parse_variants(args.variants) if args.variants else None
    except ValueError as error:
        parser.error(str(error))

    from pagedkv.mlx_backend.kernels import decode

    if decode.backend() != "cuda" or shutil.which("ncu") is None:
        print("ncu_decode: needs a CUDA GPU as MLX's default device and Nsight Compute's `ncu`")
        return 1
    variants = variants or []
    if args.child:
        child(cells, splits, variants, args.child, 1 if args.details else REPEATS)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        labels_path, report = os.path.join(tmp, "labels.json"), os.path.join(tmp, "ncu.csv")
        what = ["--metrics", "gpu__time_duration.sum", "--csv", "--page", "raw"]
        if args.details:
            what = [item for name in DETAIL_SECTIONS for item in ("--section", name)]
        command = [
            "ncu", "--profile-from-start", "off", "--cache-control", "all", "--clock-control",
            "none", *what, "--log-file", report, sys.executable, __file__, *argv,
            "--child", labels_path,
        ]  # fmt: skip
        print(f"ncu_decode: profiling {len(cells)} cells under ncu ...", flush=True)
        code = subprocess.run(command).returncode
        if code != 0 or not os.path.exists(labels_path):  # ncu or the profiled run failed
            print(f"ncu_decode: the profiled run failed (exit {code}); the end of ncu's log:")
            if os.path.exists(report):
                with open(report) as f:
                    print(f.read()[-2000:])
            return 1
        with open(labels_path) as f:
            labels = json.load(f)
        if args.details:
            for index, label in enumerate(labels, 1):
                print(f"call {index} (marker grid ({index}, 1, 1)): {label}")
            with open(report) as f:
                print(f.read())
            return 0
        with open(report, newline="") as f:
            times = durations_by_call(list(csv.reader(f)), len(labels))
    results = [(label, times.get(i, float("nan"))) for i, label in enumerate(labels, 1)]
    for cell in dict.fromkeys(label.split()[0] for label, _ in results):
        row = [
            (label.split(" ", 1)[1], us) for label, us in results if label.startswith(cell + " ")
        ]
        print(f"{cell}: " + "  ".join(f"{name} {us:.1f}" for name, us in row) + "  (µs)")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["call", "us"])
            writer.writerows((label, round(us, 2)) for label, us in results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
