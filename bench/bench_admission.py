"""Admission cost vs pool size with a full prefix index, and the 100k-request serving trace.

pytest bench/bench_admission.py --benchmark-only --benchmark-group-by=group -s
(`pagedkv bench admission --full` and `pagedkv bench trace --full` print the same as tables.)
"""

from functools import cache

import pytest

from pagedkv.benchmarks.admission import SIZES, Workload, measure
from pagedkv.benchmarks.trace import run_trace

mx = pytest.importorskip("mlx.core", reason="the backend benchmarks need MLX (pagedkv[mlx])")
from pagedkv.mlx_backend import PagedCache as MLXCache  # noqa: E402


@cache
def workload(num_blocks: int) -> Workload:
    return Workload(MLXCache, num_blocks)


@pytest.mark.benchmark(group="admission vs cached blocks")
@pytest.mark.parametrize("op", ["can_add", "add_round", "can_extend"])
@pytest.mark.parametrize("num_blocks", SIZES)
def bench_admission(record_device, num_blocks, op):
    if record_device.disabled and num_blocks > SIZES[0]:
        pytest.skip("benchmarks disabled: the smallest pool is enough to run the code")
    w = workload(num_blocks)
    record_device.pedantic(getattr(w, op), rounds=1 if record_device.disabled else 200)
    w.cache.check_invariants()


@pytest.mark.benchmark(group="admission: largest / smallest pool, interleaved")
def bench_admission_ratio(record_device):
    """The figure of issue 12: all pool sizes timed alternately; ratios in extra_info."""
    sizes = SIZES if not record_device.disabled else SIZES[:2]
    cells = record_device.pedantic(
        measure,
        kwargs={"sizes": sizes, "repeats": 10 if record_device.disabled else 200},
        rounds=1,
    )
    for name in ("can_add_us", "add_round_us", "can_extend_us"):
        ratio = getattr(cells[-1], name) / getattr(cells[0], name)
        record_device.extra_info[f"{name}_ratio"] = ratio
        print(f"\n{name}: " + ", ".join(f"{getattr(c, name):.1f}" for c in cells), end="")
        print(f" (largest / smallest {ratio:.2f})")


@pytest.mark.benchmark(group="serving trace, metadata only")
def bench_trace(record_device):
    requests = 2_000 if record_device.disabled else 100_000
    windows = record_device.pedantic(
        lambda: list(run_trace(requests=requests, window=requests // 10)), rounds=1
    )
    costs = [w.us_per_request for w in windows]
    record_device.extra_info.update(
        us_per_request=costs,
        rss_mib=[w.rss_mib for w in windows],
        last_over_first=costs[-1] / costs[0],
    )
