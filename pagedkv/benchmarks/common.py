"""Timing and environment helpers for the benchmarks."""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable


def device_info() -> dict[str, str]:
    """MLX version and device, and the host: recorded with every figure."""
    info = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import mlx.core as mx

        info["mlx"] = mx.__version__
        device = mx.default_device()
        info["device"] = str(device)
        if device.type == mx.gpu:
            try:
                info["device_name"] = mx.device_info().get("device_name", "gpu")
            except Exception:  # noqa: BLE001 - older MLX has no device_info
                info["device_name"] = "gpu"
        else:
            info["device_name"] = platform.processor() or platform.machine()
    except ImportError:
        info["mlx"] = "not installed"
    return info


def synced(fn: Callable[[], object]) -> Callable[[], object]:
    """Wraps fn so that its MLX result is evaluated and the device synchronized inside the call."""
    import mlx.core as mx

    def run():
        out = fn()
        if out is not None:
            mx.eval(out)
        mx.synchronize()
        return out

    return run


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() (which must synchronize itself if it runs device work)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def progress(done: int, total: int, label: str, started: float) -> None:
    """One progress line on stderr: `[done/total] label (seconds since started)`."""
    print(
        f"  [{done}/{total}] {label} ({time.perf_counter() - started:.1f}s)",
        file=sys.stderr,
        flush=True,
    )
