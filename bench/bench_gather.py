"""Paged decode attention microbench (no model): contiguous SDPA, gather -> SDPA, the fused
kernel. PAGEDKV_BENCH_FULL=1 runs the whole sweep. Each round issues CALLS calls, then one eval and
synchronize (small cells would otherwise measure MLX's per-call floor), each call on the next copy
of the cell's arrays and given the previous call's output as its query, as a model's layers are (so
that no call's K/V comes from the L2 cache: `pagedkv.benchmarks.gather`); divide by extra_info's
calls_per_round for the time per call.

pytest bench/bench_gather.py --benchmark-only --benchmark-group-by=group
"""

import os

import pytest

mx = pytest.importorskip("mlx.core", reason="the attention benchmarks need MLX (pagedkv[mlx])")
from pagedkv.benchmarks.gather import (  # noqa: E402
    FULL,
    QUICK,
    cell_arrays,
    chained,
    path_calls,
)
from pagedkv.mlx_backend.kernels import decode  # noqa: E402

SWEEP = FULL if os.environ.get("PAGEDKV_BENCH_FULL") else QUICK
CALLS = 20


def path_call(context: int, batch: int, block: int, path: str):
    query, pools, dense, decode_batch = cell_arrays(context, batch, block)
    return chained(path_calls(pools, dense, decode_batch)[path], query[:, :, None, :])


@pytest.mark.parametrize("path", ["contiguous", "gather_sdpa", "kernel"])
@pytest.mark.parametrize("block", SWEEP["blocks"])
@pytest.mark.parametrize("batch", SWEEP["batches"])
@pytest.mark.parametrize("context", SWEEP["contexts"])
def bench_paged_decode_attention(record_device, context, batch, block, path):
    if path == "kernel" and decode.backend() is None:
        pytest.skip(f"no paged attention kernel on {mx.default_device()} (CUDA or Metal GPUs only)")
    if record_device.disabled:  # smoke run: one small cell is enough to prove every path works
        context, batch = 64, 1
    record_device.group = f"decode attention ctx={context} batch={batch} block={block}"
    fn = path_call(context, batch, block, path)
    calls = 1 if record_device.disabled else CALLS

    def round_of_calls():
        mx.eval([fn() for _ in range(calls)])
        mx.synchronize()

    record_device.extra_info.update(calls_per_round=calls)
    record_device.pedantic(
        round_of_calls,
        rounds=1 if record_device.disabled else 10,
        warmup_rounds=0 if record_device.disabled else 1,
    )
