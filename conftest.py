"""Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (dev by default; `make test` uses ci).

MLX's CUDA backend computes some float32 kernels (masked SDPA with several queries) in TF32 by
default, about 1e-4 off the float32 result; the suite holds float32 attention to 1e-5, so it asks
for full float32 unless the caller chose otherwise. No effect on Metal or the CPU.
"""

import os

from hypothesis import HealthCheck, Phase, settings

os.environ.setdefault("MLX_ENABLE_TF32", "0")  # before anything imports MLX

# PAGEDKV_TEST_DEVICE=cpu|gpu pins MLX's default device for the whole run. CI sets cpu on GitHub's
# macOS runners, whose GPU is a paravirtual device that Metal compute cannot rely on.
_device = os.environ.get("PAGEDKV_TEST_DEVICE")
if _device:
    import mlx.core as mx

    mx.set_default_device({"cpu": mx.cpu, "gpu": mx.gpu}[_device])


_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=30, stateful_step_count=30, **_common)
settings.register_profile(
    "ci", max_examples=200, stateful_step_count=50, derandomize=True, print_blob=True, **_common
)
settings.register_profile("nightly", max_examples=2000, stateful_step_count=100, **_common)
# tools/mutate.py: the ci budget, without shrinking (a mutant only needs to fail, not be explained)
settings.register_profile(
    "mutate",
    max_examples=200,
    stateful_step_count=50,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    **_common,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
