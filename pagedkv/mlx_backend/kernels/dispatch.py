"""Which decode-attention path runs: the fused kernel or gather -> SDPA.

`PAGEDKV_ATTENTION` chooses, read at every decision so tests and users can change it:

- `auto` (default): the kernel where it is known good, else gather. On NVIDIA (MLX's CUDA build)
  the kernel is verified by the GPU parity suite, so `auto` uses it for every shape it covers. On
  Apple GPUs the Metal kernel has never run on real hardware (no Mac was available), so `auto`
  first runs a one-time self-check per shape: the kernel against the gather path on the real
  shapes, for correctness and for speed, and uses it only if it matches and is faster; otherwise
  it says why once (a warning) and keeps gather. A Mac user is never worse off than gather. The
  verdict stands for every later call of the shape, whatever its split count, so the check runs
  every form a launch can take (`CHECKED_SPLITS`), not only the first call's.
- `kernel`: always the kernel; raises ConfigError where there is none (the CPU) or the shape is
  not covered.
- `gather`: always gather -> SDPA (the portable path and the oracle).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from pagedkv.errors import ConfigError
from pagedkv.mlx_backend.kernels import decode

MODES = ("auto", "kernel", "gather")
ENV = "PAGEDKV_ATTENTION"
CHECK_TOLERANCE = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 5e-2}
# Split counts the self-check also runs, one per form of the launch: one pass (the `final`
# epilogue), partials merged by the `reduce` kernel, and more splits than that kernel's 128
# threads (its loops over the splits then go round more than once). A short first call would
# otherwise check one pass only, and a longer context later run the other kernels unchecked.
CHECKED_SPLITS = (1, 2, decode.MAX_SPLITS)


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(f"{ENV}={value!r} is not one of {MODES}; unset it for 'auto'.")
    return value


@dataclass(frozen=True)
class Verdict:
    """The outcome of a self-check: whether the kernel may be used, and why (for the message)."""

    use_kernel: bool
    reason: str


def self_check(
    kernel: Callable[[], mx.array],
    gather: Callable[[], mx.array],
    tolerance: float,
    repeats: int = 20,
    forms: dict[str, Callable[[], mx.array]] | None = None,
) -> Verdict:
    """Runs both paths on the same inputs: the kernel must match gather within `tolerance`
    (max abs difference) and take less time (median of `repeats` timed calls each).
    `forms`: {name: call} of the same kernel launched other ways (other split counts); each must
    match gather too. Only `kernel`, the launch the calls will make, is timed."""
    calls = {"": kernel, **(forms or {})}
    try:
        want = gather()
        got = {name: call() for name, call in calls.items()}
        mx.eval(want, *got.values())
    except Exception as error:  # noqa: BLE001 - a kernel that fails to build or run is rejected
        return Verdict(False, f"the kernel failed to run ({type(error).__name__}: {error})")
    for name, out in got.items():
        error = float(mx.abs(out.astype(mx.float32) - want.astype(mx.float32)).max())
        if not error <= tolerance:  # also rejects NaN
            form = f" ({name})" if name else ""
            return Verdict(
                False, f"the kernel{form} differs from gather by {error:.3g} > {tolerance:g}"
            )
    kernel_s, gather_s = _median_seconds(kernel, repeats), _median_seconds(gather, repeats)
    if kernel_s >= gather_s:
        return Verdict(
            False, f"the kernel is slower ({kernel_s * 1e6:.0f} us vs {gather_s * 1e6:.0f} us)"
        )
    return Verdict(True, f"kernel {kernel_s * 1e6:.0f} us vs gather {gather_s * 1e6:.0f} us")


def _median_seconds(fn: Callable[[], mx.array], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


class Dispatcher:
    """Decides kernel or gather per shape; remembers self-check verdicts (one check per shape)."""

    def __init__(self) -> None:
        self.verdicts: dict[tuple, Verdict] = {}
        # (mode as set, backend, dtypes, sizes, sinks) -> use the kernel: attention.decode_attention
        # asks once per layer per step, so the answer is looked up, not re-derived
        self.choices: dict[tuple, bool] = {}

    def use_kernel(
        self,
        shape: decode.Shape,
        check: Callable[[], Verdict],
        backend_name: str | None = None,
        chosen: str | None = None,
    ) -> bool:
        """`check` runs the self-check on the real shapes (called at most once per shape, and
        only where `auto` needs it). backend_name/chosen default to the device and $PAGEDKV_ATTENTION."""
        chosen = chosen or mode()
        if chosen == "gather":
            return False
        backend_name = backend_name if backend_name is not None else decode.backend()
        unsupported = decode.supported(shape.head_dim, shape.pool_dtype, shape.query_dtype)
        if chosen == "kernel":
            if backend_name is None:
                raise ConfigError(
                    f"{ENV}=kernel, but MLX's default device ({mx.default_device()}) has no paged "
                    "attention kernel (CUDA or Metal GPUs only); use auto or gather."
                )
            if unsupported:
                raise ConfigError(f"{ENV}=kernel, but the kernel does not cover {unsupported}.")
            return True
        if backend_name is None or unsupported:
            return False
        if backend_name == "cuda":  # verified by the GPU parity suite (docs/benchmarks/)
            return True
        key = (backend_name, shape)
        if key not in self.verdicts:
            verdict = check()
            self.verdicts[key] = verdict
            if not verdict.use_kernel:
                warnings.warn(
                    f"pagedkv: the {backend_name} paged-attention kernel is not used for "
                    f"{shape.label}: {verdict.reason}; using gather -> SDPA.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return self.verdicts[key].use_kernel


DISPATCHER = Dispatcher()
