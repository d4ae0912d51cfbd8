"""The GPU timeline of pipelined decode steps (Nsight Systems): busy time, idle gaps, kernels.

    python tools/nsys_step.py [BATCH] [VARIANT ...] [--steps N] [--small]

A Llama-3-8B-shaped bfloat16 model (random weights), BATCH 2048-token prompts (default 1), sides
as in `tools/step_split.py`: mlx-lm's caches, the paged store as shipped, and the paged VARIANTs
that tool knows. Each side decodes N steps (default 16) as mlx-lm's generate_step does (step n+1
built and scheduled while the GPU runs step n) under `nsys profile --cuda-graph-trace=node`, so
every kernel of MLX's CUDA graphs is on the timeline at its real start and end. Per side: wall time
per step on the GPU (first kernel start to last kernel end), the time some kernel ran, the idle
rest and its gaps over 10 µs, kernels per step, and the kernels that take the most time (a
whole-pool copy shows as a copy kernel far slower than the ~2 µs row write).
Needs a CUDA GPU as MLX's default device and `nsys` on PATH; elsewhere it says so and exits 1.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_split, run as a script or loaded

MARKER = "nsys_step_marker"
WARMUP = 3
TOP = 10
GAP_US = 10.0


def trace_rows(path: str) -> list[tuple[str, int, float, float]]:
    """nsys's cuda_gpu_trace CSV -> (name, grid x, start µs, duration µs) per kernel, by start."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    kernels = []
    for row in rows:
        name = row.get("Name", "")
        grid = (row.get("GrdX") or "").strip()
        if not row.get("Duration (ns)") or not grid.isdigit():
            continue  # a memcpy or memset: no grid
        start, duration = float(row["Start (ns)"]) / 1e3, float(row["Duration (ns)"]) / 1e3
        kernels.append((name, int(grid), start, duration))
    return sorted(kernels, key=lambda k: k[2])


def by_side(
    kernels: list[tuple[str, int, float, float]],
) -> dict[int, list[tuple[str, float, float]]]:
    """{side (its marker's grid x): [(name, start, duration)] of the kernels after that marker}."""
    sides: dict[int, list[tuple[str, float, float]]] = {}
    side = None
    for name, grid, start, duration in kernels:
        if MARKER in name:
            side = grid
            sides[side] = []
        elif side is not None:
            sides[side].append((name, start, duration))
    return sides


def timeline(kernels: list[tuple[str, float, float]], steps: int) -> dict[str, float]:
    """Per step: wall µs (first start to last end), busy µs (the union of kernel intervals),
    idle µs, gaps over GAP_US and their µs, kernels."""
    if not kernels:
        return {"wall": 0.0, "busy": 0.0, "idle": 0.0, "gaps": 0.0, "gap_us": 0.0, "kernels": 0.0}
    busy = gap_us = 0.0
    gaps = 0
    first = kernels[0][1]
    end = first
    for _, start, duration in kernels:
        if start > end:
            if start - end > GAP_US:
                gaps += 1
                gap_us += start - end
            end = start
        finish = start + duration
        if finish > end:
            busy += finish - max(start, end)
            end = finish
    wall = end - first
    return {
        "wall": wall / steps,
        "busy": busy / steps,
        "idle": (wall - busy) / steps,
        "gaps": gaps / steps,
        "gap_us": gap_us / steps,
        "kernels": len(kernels) / steps,
    }


def summary(
    sides: dict[int, list[tuple[str, float, float]]], labels: list[str], steps: int
) -> list[str]:
    lines = []
    for index, label in enumerate(labels, 1):
        kernels = sides.get(index, [])
        t = timeline(kernels, steps)
        lines.append(
            f"== {label}: {t['wall']:.0f} µs/step on the GPU, busy {t['busy']:.0f}, idle "
            f"{t['idle']:.0f} ({t['gaps']:.1f} gaps > {GAP_US:.0f} µs: {t['gap_us']:.0f} µs), "
            f"{t['kernels']:.0f} kernels/step"
        )
        totals: dict[str, list[float]] = {}
        for name, _, duration in kernels:
            totals.setdefault(name, []).append(duration)
        ranked = sorted(totals.items(), key=lambda item: -sum(item[1]))[:TOP]
        for name, durations in ranked:
            lines.append(
                f"  {sum(durations) / steps:8.1f} µs/step  {len(durations) / steps:5.0f} x  "
                f"mean {sum(durations) / len(durations):7.2f} µs  {name[:90]}"
            )
    return lines


def child(batch: int, variants: list[str], steps: int, small: bool) -> None:
    """Under nsys: every side prefilled and warm, then `steps` pipelined steps after a marker."""
    import ctypes

    import mlx.core as mx
    import step_split

    from pagedkv.benchmarks.throughput import dense_side, paged_side, prompts_for
    from pagedkv.models import LLAMA3_8B, SMALL, random_model

    model = random_model(SMALL if small else LLAMA3_8B, dtype="bfloat16")
    prompts = prompts_for(model.args.vocab_size, batch, 2048, False)
    sides = [("", dense_side(model, prompts))]
    stores = []
    for variant in ["", *variants]:
        step_split.apply("")
        ahead = step_split.tokens_ahead(variant, prompts, 2 * (WARMUP + steps) + 8)
        call, first, store = paged_side(model, prompts, ahead, 16, True)
        sides.append((variant, (call, first)))
        stores.append(store)
    marker = mx.fast.cuda_kernel(
        name=MARKER, input_names=["x"], output_names=["y"], source="y[0] = x[0];"
    )
    one = mx.zeros((1,))

    def step(call, tokens):
        return mx.argmax(call(tokens[:, None])[:, -1], axis=-1)

    driver = ctypes.CDLL("libcuda.so.1")
    for index, (variant, (call, tokens)) in enumerate(sides, 1):
        step_split.apply(variant)
        for _ in range(WARMUP):
            tokens = step(call, tokens)
            mx.eval(tokens)
        mx.synchronize()
        driver.cuProfilerStart()
        mx.eval(marker(inputs=[one], grid=(index, 1, 1), threadgroup=(1, 1, 1),
                       output_shapes=[(1,)], output_dtypes=[mx.float32])[0])  # fmt: skip
        for _ in range(steps):  # as generate_step: the next step scheduled before waiting
            tokens = step(call, tokens)
            mx.async_eval(tokens)
        mx.eval(tokens)
        mx.synchronize()
        driver.cuProfilerStop()
        step_split.apply("")
    for store in stores:
        store.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "words", nargs="*", metavar="[BATCH] [VARIANT ...]",
        help="rows per step (1-64, default 1), then paged variants of tools/step_split.py",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=16, help="traced steps per side (1-64)")
    parser.add_argument("--small", action="store_true", help="the 4-layer benchmark model")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    words = args.words
    args.batch = int(words.pop(0)) if words and words[0].lstrip("-").isdigit() else 1
    args.variants = words
    if not 1 <= args.batch <= 64:
        parser.error(f"batch is in [1, 64], got {args.batch}")
    if not 1 <= args.steps <= 64:
        parser.error(f"--steps is in [1, 64], got {args.steps}")
    import step_split

    for variant in args.variants:  # refuses a bad one (exits) before any GPU work
        step_split.apply(variant)
    step_split.apply("")

    from pagedkv.mlx_backend.kernels import decode

    if decode.backend() != "cuda" or shutil.which("nsys") is None:
        print("nsys_step: needs a CUDA GPU as MLX's default device and Nsight Systems' `nsys`")
        return 1
    if args.child:
        child(args.batch, args.variants, args.steps, args.small)
        return 0
    labels = ["dense", "paged (shipped)", *("paged " + v for v in args.variants)]
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "step")
        command = [
            "nsys", "profile", "--trace=cuda", "--cuda-graph-trace=node", "--sample=none",
            "--cpuctxsw=none", "--capture-range=cudaProfilerApi", "--capture-range-end=repeat",
            "--force-overwrite=true", "-o", report, sys.executable, __file__, *argv, "--child",
        ]  # fmt: skip
        print(f"nsys_step: building the model and tracing {args.steps} steps per side ...")
        code = subprocess.run(command).returncode
        reports = sorted(glob.glob(report + "*.nsys-rep"))
        if code != 0 or not reports:
            print(f"nsys_step: the traced run failed (exit {code})")
            return 1
        sides: dict[int, list[tuple[str, float, float]]] = {}
        for index, path in enumerate(reports):  # one per traced side (each its own clock)
            stats = os.path.join(tmp, f"stats{index}")
            subprocess.run(
                ["nsys", "stats", "--report", "cuda_gpu_trace", "--format", "csv",
                 "--force-export=true", "--output", stats, path],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            for csv_path in glob.glob(stats + "*cuda_gpu_trace*.csv"):
                sides.update(by_side(trace_rows(csv_path)))
    if not sides:  # no marker found: another nsys version's column names, or a failed side
        print("nsys_step: no marker kernel in the trace; read it with `nsys stats` by hand")
        return 1
    print("\n".join(summary(sides, labels, args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
