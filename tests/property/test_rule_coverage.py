"""The differential machine reaches every rule, eviction under reuse included, in a short run."""

import pytest

from tests.property.coverage import REQUIRED, rule_counts

pytest.importorskip("mlx.core", reason="the differential machine needs MLX (pagedkv[mlx])")


def test_a_short_run_reaches_every_rule():
    from tests.property.test_differential_machine import DifferentialMachine

    counts = rule_counts(DifferentialMachine, examples=100, steps=50)
    missing = [event for event in REQUIRED if not counts.get(event)]
    assert not missing, f"never reached: {missing}; counts: {counts}"
