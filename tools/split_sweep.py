"""The paged decode kernel at forced split counts against the split-count rule and cuDNN.

    python tools/split_sweep.py [CELLS] [--splits 1,2,4,...] [--csv PATH] [--ab-rounds N]
    e.g.  python tools/split_sweep.py 2048x1,8192x1,32768x1,4096x16

CELLS: context x batch (default: 2048, 8192 and 32768 at batch 1, 4 and 16). The cell is
`pagedkv bench gather`'s (float16, head_dim 128, 32 query / 8 kv heads, block 16, scattered block
ids) and so is the timing: many calls per synchronize, chained as a model's layers are,
consecutive calls on different copies of the K/V so nothing is read from L2
(`pagedkv.benchmarks.gather`). Per cell it prints microseconds per call for contiguous SDPA
(MLX's default path: cuDNN on CUDA), the kernel with the count `split_count` picks, and the kernel
at every forced count the cell allows; the best forced count is starred. On CUDA it also times
the rule's count both ways the splits can merge: in pass 1's launch (`one_launch_us`) and by a
second kernel (`two_launch_us`), alternated `--ab-rounds` times (median; a batch-1 cell moves by
up to 10 us between two timings of the same code). What the next change to `decode.split_count`
or the kernel is judged by. Needs a GPU with a kernel
backend (CUDA; Metal untested); on the CPU it says so and exits 1.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys

from pagedkv.benchmarks.gather import (
    HEAD_DIM,
    cell_arrays,
    chained,
    parse_cells,
    path_calls,
    per_call_us,
)
from pagedkv.mlx_backend.kernels import decode

DEFAULT_CELLS = [(c, b) for b in (1, 4, 16) for c in (2048, 8192, 32768)]
DEFAULT_SPLITS = (1, 2, 4, 8, 16, 32, 64, 128)
BLOCK = 16


def parse_splits(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); ValueError unless every count is in [1, MAX_SPLITS]."""
    items = text.split(",")
    if not all(i.isdigit() and 1 <= int(i) <= decode.MAX_SPLITS for i in items):
        raise ValueError(f"split counts are integers in [1, {decode.MAX_SPLITS}], got {text!r}")
    return tuple(int(i) for i in items)


def sweep_cell(
    context: int, batch: int, splits: tuple[int, ...], ab_rounds: int = 1
) -> dict[str, float]:
    query, pools, dense, decode_batch = cell_arrays(context, batch, BLOCK)
    scale = HEAD_DIM**-0.5

    def kernel_us(num_splits: int | None) -> float:
        # Prepared once, called per copy, as a decode step calls it (and pagedkv bench gather).
        queries = query[:, :, None, :]  # [B, q_heads, 1, D]: the shape each chained call gets
        launch = decode.prepare(queries, pools[0][0], decode_batch, scale, False, num_splits)
        calls = [lambda q, k=k, v=v: launch(q, k, v) for k, v in pools]
        return per_call_us(chained(calls, queries))

    row = {
        "context": context,
        "batch": batch,
        "cudnn_us": per_call_us(
            chained(path_calls(pools, dense, decode_batch)["contiguous"], query[:, :, None, :])
        ),
    }
    row["rule_splits"] = decode.prepare(query, pools[0][0], decode_batch, scale, False).splits
    row["rule_us"] = kernel_us(None)
    if decode.backend() == "cuda" and row["rule_splits"] > 1:  # A/B: where the splits merge
        shipped, times = decode.ONE_LAUNCH, {"one_launch_us": [], "two_launch_us": []}
        try:
            for _ in range(ab_rounds):  # alternated, so a drift in clocks hits both alike
                for one_launch, column in ((True, "one_launch_us"), (False, "two_launch_us")):
                    decode.ONE_LAUNCH = one_launch
                    times[column].append(kernel_us(None))
        finally:
            decode.ONE_LAUNCH = shipped
        row.update({column: statistics.median(t) for column, t in times.items()})
    blocks = -(-context // BLOCK)
    for n in splits:
        if n <= min(blocks, decode.MAX_SPLITS):  # a split holds whole blocks
            row[f"s{n}_us"] = kernel_us(n)
    return row


def two_launch_text(row: dict) -> str:
    if "two_launch_us" not in row:
        return ""
    one, two, cudnn = row["one_launch_us"], row["two_launch_us"], row["cudnn_us"]
    return f"; one launch {one:.1f} us {one / cudnn:.2f}x, two launches {two:.1f} us {two / cudnn:.2f}x"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "cells", nargs="?", default=None, help="CONTEXTxBATCH,... (default: 9 cells)"
    )
    parser.add_argument("--splits", default=",".join(map(str, DEFAULT_SPLITS)))
    parser.add_argument("--csv", default=None, help="also write the rows here")
    parser.add_argument(
        "--ab-rounds", type=int, default=3, help="one/two-launch timings alternated, median taken"
    )
    args = parser.parse_args(argv)
    try:
        cells = parse_cells(args.cells) if args.cells else DEFAULT_CELLS
        splits = parse_splits(args.splits)
    except ValueError as error:
        parser.error(str(error))
    if args.ab_rounds < 1:
        parser.error(f"--ab-rounds must be at least 1, got {args.ab_rounds}")
    if decode.backend() is None:
        print("split_sweep: the default device has no kernel backend (CUDA or Metal GPU)")
        return 1
    rows = []
    for i, (context, batch) in enumerate(cells, 1):
        row = sweep_cell(context, batch, splits, args.ab_rounds)
        rows.append(row)
        forced = {k: v for k, v in row.items() if k.startswith("s") and k.endswith("_us")}
        best = min(forced, key=forced.get, default=None)  # none when every count is too many
        cells_text = "  ".join(
            f"{k[1:-3]}:{v:.1f}{'*' if k == best else ''}" for k, v in forced.items()
        )
        print(
            f"[{i}/{len(cells)}] ctx {context} batch {batch}: cudnn {row['cudnn_us']:.1f} us, "
            f"rule {row['rule_splits']} splits {row['rule_us']:.1f} us "
            f"({row['rule_us'] / row['cudnn_us']:.2f}x{two_launch_text(row)}); forced {cells_text}",
            flush=True,
        )
    if args.csv:
        columns = list(dict.fromkeys(k for r in rows for k in r))  # every cell's columns, in order
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: round(v, 2) for k, v in r.items()} for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
