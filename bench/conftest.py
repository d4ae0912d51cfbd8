"""Benchmarks record the device and MLX version in every result's extra_info."""

import pytest

from pagedkv.benchmarks.common import device_info


@pytest.fixture
def record_device(benchmark):
    benchmark.extra_info.update(device_info())
    return benchmark
