"""Is the kernel's batch-1 gap at long context the pool layout? The same bytes, two layouts.

    python tools/layout_probe.py [CONTEXT,...] [--rounds N]   (default 16384,32768, 3 rounds)

At batch 1 the paged kernel reads a 32k context at about 1.6 TB/s where cuDNN SDPA on contiguous
K/V reads 2.1 (docs/benchmarks.md section 3, H100). In the pools (layout A: [blocks, block_size,
kv_heads, head_dim]) one kv head's rows are head_dim * 2 bytes at a stride of kv_heads times
that, where the contiguous K/V streams each head's rows back to back. This times, chained and
cold as `pagedkv bench gather` does (float16, head_dim 128, block 16, scattered block ids), the
kernel and cuDNN on the benchmark's batch-1 cell (8 kv heads x 4 query heads) and on batch 8 with
1 kv head x 4 query heads: the same K/V bytes, the same number of threadblocks per launch (the
split rule gives both the same count), but each pool row of the second is one head's, so a
threadblock's keys are contiguous within a block. Alternated `--rounds` times, medians. If the
second reads much faster, the stride is the cause. Needs a GPU with a kernel backend.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from pagedkv.benchmarks.gather import cell_arrays, chained, kv_bytes, path_calls, per_call_us
from pagedkv.mlx_backend.kernels import decode

LAYOUTS = ((1, 8), (8, 1))  # (batch, kv heads): equal K/V bytes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contexts", nargs="?", default="16384,32768")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
        if any(c < 16 for c in contexts) or args.rounds < 1:
            raise ValueError
    except ValueError:
        parser.error(f"contexts are integers >= 16 and --rounds >= 1, got {argv}")
    if decode.backend() is None:
        print("layout_probe: the default device has no kernel backend (CUDA or Metal GPU)")
        return 1
    for context in contexts:
        nbytes = kv_bytes(context, 1)  # batch 1 x 8 kv heads = batch 8 x 1 kv head
        timed = {}
        for batch, kv_heads in LAYOUTS:
            query, pools, dense, decode_batch = cell_arrays(
                context, batch, 16, copies=2, kv_heads=kv_heads
            )
            calls = path_calls(pools, dense, decode_batch)
            splits = decode.prepare(query, pools[0][0], decode_batch, 128**-0.5, False).splits
            for path in ("contiguous", "kernel"):
                timed[(batch, kv_heads, path)] = (
                    splits,
                    chained(calls[path], query[:, :, None, :]),
                )
        times = {key: [] for key in timed}
        for _ in range(args.rounds):
            for key, (_, chain) in timed.items():
                times[key].append(per_call_us(chain))
        for (batch, kv_heads, path), values in times.items():
            us = statistics.median(values)
            print(
                f"ctx {context} batch {batch} x {kv_heads} kv heads, {path}: {us:.1f} us "
                f"= {nbytes / us / 1e6:.2f} TB/s ({timed[(batch, kv_heads, path)][0]} splits)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
