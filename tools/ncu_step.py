"""GPU time per kernel of one model decode step (Nsight Compute), mlx-lm's caches vs paged.

mlx-lm's KVCache against the paged store with routed attention.

    python tools/ncu_step.py [BATCH] [--steps N] [--small]

A Llama-3-8B-shaped bfloat16 model with random weights (`--small`: the 4-layer benchmark model),
BATCH 2048-token prompts built as `pagedkv bench throughput` builds them (default 1). Each side is
prefilled, decodes 3 steps, then N more (default 2) while Nsight Compute records every kernel
(`--cache-control none`: the caches as a running model leaves them; `--clock-control none`).
ncu runs kernels one at a time, so these figures are GPU work only; host time, launch gaps and
overlap are what `tools/step_split.py` measures on the same model. Per side: GPU µs per step,
kernels per step, and the kernels that take the most time.
Needs a CUDA GPU as MLX's default device and `ncu` on PATH; elsewhere it says so and exits 1.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ncu_decode, run as a script or loaded

from ncu_decode import kernel_rows, marker_index  # noqa: E402

MARKER = "ncu_step_marker"
SIDES = ("mlx-lm", "paged")
WARMUP = 3
TOP = 12


def kernel_times(rows: list[list[str]]) -> dict[int, dict[str, list[float]]]:
    """ncu's raw CSV rows -> {side (the marker's index): {kernel name: its durations in µs}} for
    the kernels launched after each side's marker."""
    times: dict[int, dict[str, list[float]]] = {}
    side = None
    for kernel, grid, us in kernel_rows(rows):
        if MARKER in kernel:
            side = marker_index(grid)
            times.setdefault(side, {})
        elif side is not None:
            times[side].setdefault(kernel, []).append(us)
    return times


def summary(times: dict[int, dict[str, list[float]]], steps: int, top: int = TOP) -> list[str]:
    """Per side: GPU µs and kernels per step, then its `top` kernels by time per step."""
    lines = []
    for index, label in enumerate(SIDES, 1):
        kernels = times.get(index, {})
        total = sum(sum(durations) for durations in kernels.values())
        count = sum(len(durations) for durations in kernels.values())
        lines.append(
            f"== {label}: {total / steps:.0f} µs of GPU time per step, "
            f"{count / steps:.0f} kernels per step"
        )
        ranked = sorted(kernels.items(), key=lambda item: -sum(item[1]))[:top]
        for name, durations in ranked:
            lines.append(
                f"  {sum(durations) / steps:8.1f} µs/step  {len(durations) / steps:5.0f} x  "
                f"mean {sum(durations) / len(durations):7.2f} µs  {name[:100]}"
            )
    return lines


def child(batch: int, steps: int, small: bool) -> None:
    """Under ncu: both sides prefilled and warm, then `steps` profiled steps each after a marker."""
    import ctypes

    import mlx.core as mx

    from pagedkv.benchmarks.throughput import dense_side, paged_side, prompts_for
    from pagedkv.models import LLAMA3_8B, SMALL, random_model

    model = random_model(SMALL if small else LLAMA3_8B, dtype="bfloat16")
    prompts = prompts_for(model.args.vocab_size, batch, 2048, False)
    call, first, store = paged_side(model, prompts, WARMUP + steps + 8, 16, True)
    sides = [dense_side(model, prompts), (call, first)]
    marker = mx.fast.cuda_kernel(
        name=MARKER, input_names=["x"], output_names=["y"], source="y[0] = x[0];"
    )
    one = mx.zeros((1,))

    def decode(call, tokens, count):
        for _ in range(count):  # each step evaluated before the next: steps stay apart
            tokens = mx.argmax(call(tokens[:, None])[:, -1], axis=-1)
            mx.eval(tokens)
        return tokens

    warm = [decode(call, tokens, WARMUP) for call, tokens in sides]
    mx.synchronize()
    driver = ctypes.CDLL("libcuda.so.1")
    driver.cuProfilerStart()
    for index, ((call, _), tokens) in enumerate(zip(sides, warm), 1):
        mx.eval(marker(inputs=[one], grid=(index, 1, 1), threadgroup=(1, 1, 1),
                       output_shapes=[(1,)], output_dtypes=[mx.float32])[0])  # fmt: skip
        decode(call, tokens, steps)
        mx.synchronize()
    driver.cuProfilerStop()
    store.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch", nargs="?", type=int, default=1, help="rows per step (1-64)")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per side (1-16)")
    parser.add_argument("--small", action="store_true", help="the 4-layer benchmark model")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= 64:
        parser.error(f"batch is in [1, 64], got {args.batch}")
    if not 1 <= args.steps <= 16:
        parser.error(f"--steps is in [1, 16], got {args.steps}")

    from pagedkv.mlx_backend.kernels import decode

    if decode.backend() != "cuda" or shutil.which("ncu") is None:
        print("ncu_step: needs a CUDA GPU as MLX's default device and Nsight Compute's `ncu`")
        return 1
    if args.child:
        child(args.batch, args.steps, args.small)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "ncu.csv")
        command = [
            "ncu", "--profile-from-start", "off", "--cache-control", "none", "--clock-control",
            "none", "--metrics", "gpu__time_duration.sum", "--csv", "--page", "raw",
            "--log-file", report, sys.executable, __file__, *argv, "--child",
        ]  # fmt: skip
        print(f"ncu_step: building the model and profiling {args.steps} steps per side ...")
        code = subprocess.run(command).returncode
        if code != 0 or not os.path.exists(report):
            print(f"ncu_step: the profiled run failed (exit {code})")
            return 1
        with open(report, newline="") as f:
            times = kernel_times(list(csv.reader(f)))
    print("\n".join(summary(times, args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
