"""Benchmark workloads, shared by `bench/` (pytest-benchmark) and the `pagedkv bench` command."""
