"""Host metadata per decode step (spec vs backend) and pool-write cost vs pool size.

pytest bench/bench_metadata.py --benchmark-only --benchmark-group-by=group,param:batch
"""

import os

import pytest

from pagedkv.benchmarks.metadata import (
    decode_step_workload,
    pool_write_ratio,
    pool_write_workload,
)
from pagedkv.spec import PagedCache as SpecCache

mx = pytest.importorskip("mlx.core", reason="the backend benchmarks need MLX (pagedkv[mlx])")
from pagedkv.mlx_backend import PagedCache as MLXCache  # noqa: E402

MiB = 1 << 20
LARGE_POOL = int(float(os.environ.get("PAGEDKV_BENCH_LARGE_POOL_GIB", "4")) * 1024) * MiB


@pytest.mark.benchmark(group="decode-step metadata")
@pytest.mark.parametrize("impl", ["spec", "mlx"])
@pytest.mark.parametrize("batch", [1, 8, 64])
def bench_decode_step_metadata(record_device, impl, batch):
    if impl == "spec" and batch == 64 and not record_device.disabled:
        rounds = 20  # the spec scans its trie on every extend: slow by design
    else:
        rounds = 200
    step, cache = decode_step_workload(SpecCache if impl == "spec" else MLXCache, batch)
    record_device.pedantic(step, rounds=1 if record_device.disabled else rounds, iterations=1)
    cache.check_invariants()


@pytest.mark.benchmark(group="pool write: one decode token, all layers")
@pytest.mark.parametrize("pool", ["64MiB", "large"])
def bench_pool_write(record_device, pool):
    size = (
        64 * MiB if pool == "64MiB" else (LARGE_POOL if not record_device.disabled else 256 * MiB)
    )
    write, cache = pool_write_workload(size)
    record_device.extra_info["pool_bytes"] = cache.config.pool_bytes
    record_device.pedantic(
        write,
        rounds=1 if record_device.disabled else 50,
        iterations=1,
        warmup_rounds=0 if record_device.disabled else 3,
    )


@pytest.mark.benchmark(group="pool write: large / 64 MiB, interleaved")
def bench_pool_write_ratio(record_device):
    """The figure of issue 3: both pools timed alternately in one run; the ratio is in extra_info."""
    large = LARGE_POOL if not record_device.disabled else 256 * MiB
    result = record_device.pedantic(
        pool_write_ratio,
        args=(64 * MiB, large),
        kwargs={"repeats": 3 if record_device.disabled else 200},
        rounds=1,
    )
    record_device.extra_info.update(result, large_pool_bytes=large)
    print(
        f"\npool write: 64 MiB {result['small_us']:.1f} us, {large / MiB:.0f} MiB "
        f"{result['large_us']:.1f} us, ratio {result['ratio']:.3f}"
    )
