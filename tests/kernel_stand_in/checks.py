"""What the stand-in tests share: kernel caches cleared around a test, and one case held to the
spec's split-K reference and the gather oracle with the GPU parity suite's tolerances (whose
random fragmented cases these reuse: tests/parity/test_kernel_parity.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from pagedkv.mlx_backend.kernels import decode
from pagedkv.spec.split_k import split_k_decode
from tests.parity.test_kernel_parity import TOLERANCE, case, gather_oracle


def clear_kernel_caches() -> None:
    """Kernel objects are built once per variant and kept: a stand-in's must not outlive its test,
    nor a real one be used in it."""
    decode._kernel.cache_clear()
    decode.Plan.of.cache_clear()
    decode._PLANS.clear()


def run(backend, queries, k_pool, v_pool, batch, scale, sinks=None, splits=None):
    """The kernel as a decode step calls it: prepared, then called. -> (output, splits, launch)."""
    launch = decode.prepare(queries, k_pool, batch, scale, sinks is not None, splits, backend)
    return launch(queries, k_pool, v_pool, sinks), launch.splits, launch


def check(backend, dtype, head_dim, block_size, group, lengths, splits=None, **kwargs):
    """One random case on `backend`'s kernel against the spec and gather. -> its launch."""
    (queries, k_pool, v_pool, batch, sinks), numpy, sinks_np = case(
        dtype, head_dim, block_size, group, lengths, **kwargs
    )
    scale = head_dim**-0.5 * 1.3  # not the default: the scale must reach the kernel
    out, used, launch = run(backend, queries, k_pool, v_pool, batch, scale, sinks, splits)
    assert out.dtype == queries.dtype and out.shape == queries.shape
    got = np.array(out.astype(mx.float32))
    spec = split_k_decode(*numpy, scale, used, sinks_np)
    oracle = gather_oracle(queries, k_pool, v_pool, numpy[3], numpy[4], scale, sinks)
    assert float(np.abs(got - spec).max()) <= TOLERANCE[dtype], used
    assert float(np.abs(got - oracle).max()) <= TOLERANCE[dtype], used
    return launch
