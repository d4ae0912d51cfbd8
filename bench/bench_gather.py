"""Page-gather decode microbench (no model). PAGEDKV_BENCH_FULL=1 runs the whole sweep.

pytest bench/bench_gather.py --benchmark-only --benchmark-group-by=group,param:context
"""

import os

import pytest

pytest.importorskip("mlx.core", reason="the gather benchmarks need MLX (pagedkv[mlx])")
from pagedkv.benchmarks.gather import FULL, QUICK, gather_paths  # noqa: E402

SWEEP = FULL if os.environ.get("PAGEDKV_BENCH_FULL") else QUICK
PATHS = [
    "contiguous",
    "gather_sdpa_a",
    "gather_sdpa_b",
    "gather_only_a",
    "gather_only_b",
    "append_a",
    "append_b",
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block", SWEEP["blocks"])
@pytest.mark.parametrize("batch", SWEEP["batches"])
@pytest.mark.parametrize("context", SWEEP["contexts"])
def bench_page_gather(record_device, context, batch, block, path):
    if record_device.disabled:  # smoke run: one small cell is enough to prove every path works
        context, batch = 64, 1
    record_device.group = f"page gather ctx={context} batch={batch} block={block}"
    padded, paths = gather_paths(context, batch, block)
    record_device.extra_info.update(
        padded=padded, fragmentation_pct=100 * (padded - context) / padded
    )
    record_device.pedantic(
        paths[path],
        rounds=1 if record_device.disabled else 20,
        warmup_rounds=0 if record_device.disabled else 2,
    )
