"""Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (dev by default; `make test` uses ci)."""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=30, stateful_step_count=30, **_common)
settings.register_profile(
    "ci", max_examples=200, stateful_step_count=50, derandomize=True, print_blob=True, **_common
)
settings.register_profile("nightly", max_examples=2000, stateful_step_count=100, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
