"""Kernel variants against cuDNN and each other, timed in turn: which change pays, cell by cell.

    python tools/variant_ab.py [CELLS] [--variants two,whole,one] [--rounds N] [--splits S]
    e.g.  python tools/variant_ab.py 16384x1,32768x1,32768x4,32768x16 --rounds 5

Each cell is `pagedkv bench gather`'s (float16, head_dim 128, 32 query / 8 kv heads, block 16,
scattered block ids), timed as it times them (calls chained, each on its own copy of the K/V,
many per synchronize; `pagedkv.benchmarks.gather`). Per round every path is timed once, in
turn, so drift moves all of them alike; medians over `--rounds`. Paths: contiguous SDPA (MLX's
default: cuDNN on CUDA) and the kernel as each variant builds it:
  two      as shipped: two launches, each pool handed over as a one-element view of its
           buffer (decode.POOL_VIEWS);
  whole    the pools handed over whole (decode.POOL_VIEWS off), as before the views;
  one      the splits merged in pass 1's launch (decode.ONE_LAUNCH on).
Each variant's output on the cell's query is compared with the first variant's (max |difference|).
`--splits` forces a split count for every kernel path (default: the rule's). Needs a GPU with
a kernel backend; elsewhere it says so and exits 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from pagedkv.benchmarks.gather import (
    cell_arrays,
    chained,
    in_turn,
    kv_bytes,
    parse_cells,
    path_calls,
)
from pagedkv.mlx_backend.kernels import decode

# (decode.ONE_LAUNCH, decode.POOL_VIEWS) while a variant's launch is prepared
VARIANTS = {"two": (False, True), "whole": (False, False), "one": (True, True)}


def variant_calls(variant: str, pools, dense, batch, splits: int | None) -> list:
    """The kernel's calls (one per copy) with the variant's switches set while preparing."""
    shipped = decode.ONE_LAUNCH, decode.POOL_VIEWS
    decode.ONE_LAUNCH, decode.POOL_VIEWS = VARIANTS[variant]
    try:
        if splits is None:
            return path_calls(pools, dense, batch)["kernel"]
        k_pool = pools[0][0]
        query = decode_query(batch, k_pool)
        launch = decode.prepare(query, k_pool, batch, 128**-0.5, False, splits)
        return [lambda q, k=k, v=v: launch(q, k, v) for k, v in pools]
    finally:
        decode.ONE_LAUNCH, decode.POOL_VIEWS = shipped


def decode_query(batch, k_pool):
    import mlx.core as mx

    return mx.zeros((batch.tables.shape[0], 4 * k_pool.shape[2], 1, k_pool.shape[-1]), k_pool.dtype)


def run_cell(context: int, batch: int, variants: list[str], rounds: int, splits: int | None):
    query, pools, dense, dbatch = cell_arrays(context, batch, 16)
    paths = {"cudnn": path_calls(pools, dense, dbatch)["contiguous"]}
    for variant in variants:
        paths[variant] = variant_calls(variant, pools, dense, dbatch, splits)
    import mlx.core as mx

    q4 = query[:, :, None, :]
    first = paths[variants[0]][0](q4)
    diffs = {v: mx.abs(paths[v][0](q4) - first).max().item() for v in variants}
    chains = {name: chained(calls, q4) for name, calls in paths.items()}
    times = in_turn(chains, rounds)
    us = {name: statistics.median(values) for name, values in times.items()}
    count = (
        splits
        or decode.prepare(
            decode_query(dbatch, pools[0][0]), pools[0][0], dbatch, 128**-0.5, False
        ).splits
    )
    cells = ", ".join(
        f"{name} {value:.1f} ({value / us['cudnn']:.2f}x)" for name, value in us.items()
    )
    spread = ", ".join(f"{name} {min(v):.1f}-{max(v):.1f}" for name, v in times.items())
    gbytes = kv_bytes(context, batch) / 1e9
    print(
        f"ctx {context} batch {batch} ({count} splits, {gbytes:.3f} GB K/V): {cells} us; "
        f"range {spread}; max |diff| vs {variants[0]}: {diffs}",
        flush=True,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="?", default="16384x1,32768x1,32768x4,32768x16")
    parser.add_argument("--variants", default="two,whole,one")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--splits", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        cells = parse_cells(args.cells)
        variants = args.variants.split(",")
        if any(v not in VARIANTS for v in variants) or args.rounds < 1:
            raise ValueError
        if args.splits is not None and not 1 <= args.splits <= decode.MAX_SPLITS:
            raise ValueError
    except ValueError:
        parser.error(
            f"cells are CONTEXTxBATCH, variants among {sorted(VARIANTS)}, --rounds >= 1, "
            f"--splits in [1, {decode.MAX_SPLITS}]; got {argv}"
        )
    if decode.backend() is None:
        print("variant_ab: the default device has no kernel backend (CUDA or Metal GPU)")
        return 1
    for context, batch in cells:
        run_cell(context, batch, variants, args.rounds, args.splits)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
