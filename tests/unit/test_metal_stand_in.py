"""The Metal kernel's logic, run on the CPU: `paged_decode.metal` through the real launch code.

No Mac runs this project's CI, so the Metal kernel would otherwise only be read. Here
`mx.fast.metal_kernel` is replaced by `tests.kernel_stand_in`, which compiles the kernel text as
MLX assembles it against a C++ stand-in for Metal's vocabulary and runs every threadgroup's 128
threads (real barriers, 32-lane shuffles). `decode.paged_decode(..., backend_name="metal")` then
runs as on an Apple GPU: its plan, templates, grid, the one-pass and split launches and the merge
kernel. Outputs are held to the spec's split-K reference and the gather oracle, with the GPU
parity suite's tolerances (tests/parity/test_kernel_parity.py, whose cases these reuse).

This checks what the kernel computes, not that Apple's compiler accepts it or how fast it runs:
the Metal kernel stays unverified on Apple hardware (docs/adr/0002-paged-decode-kernel.md), and
`auto` keeps its self-check there. Needs a C++20 compiler with _Float16 (g++ 12 or clang).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from pagedkv.mlx_backend.kernels import decode, source
from pagedkv.spec.split_k import split_k_decode
from tests import kernel_stand_in
from tests.kernel_stand_in import checks
from tests.parity.test_kernel_parity import RAGGED, TOLERANCE, case

pytestmark = pytest.mark.skipif(
    kernel_stand_in.unavailable("metal") is not None,
    reason=str(kernel_stand_in.unavailable("metal")),
)


@pytest.fixture(autouse=True)
def metal_on_the_cpu(monkeypatch):
    checks.clear_kernel_caches()
    monkeypatch.setattr(mx.fast, "metal_kernel", kernel_stand_in.metal_kernel)
    yield
    checks.clear_kernel_caches()


def run_metal(queries, k_pool, v_pool, batch, scale, sinks=None, splits=None):
    return checks.run("metal", queries, k_pool, v_pool, batch, scale, sinks, splits)[:2]


def check(*args, **kwargs) -> int:
    return checks.check("metal", *args, **kwargs).splits


@pytest.mark.parametrize("head_dim", decode.HEAD_DIMS)
def test_every_head_dim_split_and_merged(head_dim):
    """float16 at every head size the GPU suite runs (each sets the lanes per key row), three
    splits: pass 1's partials and the merge kernel."""
    assert check("float16", head_dim, 16, 4, RAGGED, splits=3) == 3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_other_dtypes_in_one_pass(dtype, head_dim):
    assert check(dtype, head_dim, 16, 4, RAGGED) == 1  # RAGGED is short: the rule's one pass


@pytest.mark.parametrize("block_size, group", [(8, 1), (128, 8)])
def test_block_sizes_and_gqa(block_size, group):
    check("float16", 64, block_size, group, RAGGED)


@pytest.mark.parametrize("splits", [1, 2, 7, decode.MAX_SPLITS])
def test_split_counts_including_more_than_the_merge_kernels_threads(splits):
    """MAX_SPLITS (256) is more than the merge kernel's 128 threads: its loops over the splits
    go round twice. Most of those splits are empty (3 blocks of keys)."""
    check("float32", 64, 16, 4, [1, 45], splits=splits)


def test_window_starts():
    check("float16", 128, 16, 4, [1, 10, 100, 300], window=48, splits=3)
    check("float16", 128, 16, 4, [3, 33, 200], window=1, splits=3)


def test_sinks_in_one_pass_and_in_the_merge():
    check("float32", 64, 16, 8, RAGGED, sinks=True, kv_heads=1, splits=1)
    check("float32", 64, 16, 8, RAGGED, sinks=True, kv_heads=1, splits=5)


def test_float32_queries_over_a_bfloat16_pool():
    (queries, k_pool, v_pool, batch, _), numpy, _ = case("bfloat16", 64, 16, 4, RAGGED)
    queries = queries.astype(mx.float32)
    out, used = run_metal(queries, k_pool, v_pool, batch, 0.125)
    assert out.dtype == mx.float32
    spec = split_k_decode(np.array(queries), *numpy[1:], 0.125, used)
    assert float(np.abs(np.array(out) - spec).max()) <= TOLERANCE["float32"]


def test_inputs_under_8_elements_arrive_in_the_constant_address_space():
    """A one-slot float32 pool with head_dim 4: MLX passes the pools (and queries) as `constant`
    pointers, which the kernel reads through pkv_load16's constant form."""
    rng = np.random.default_rng(1)
    k, v = (rng.standard_normal((1, 1, 1, 4)).astype(np.float32) for _ in range(2))
    queries = rng.standard_normal((1, 1, 4)).astype(np.float32)
    tables, bounds = np.zeros((1, 1), np.int32), np.array([[0, 1]], np.int32)
    batch = decode.DecodeBatch(mx.array(tables), mx.array(bounds), 1)
    kernel = kernel_stand_in.Kernel("metal", "probe", ["k_pool"], ["out"], "k_pool", "")
    assert "const constant float* k_pool" in kernel.program([mx.array(k)], [mx.float32], [])
    out, _ = run_metal(mx.array(queries), mx.array(k), mx.array(v), batch, 0.5)
    np.testing.assert_allclose(np.array(out)[0, 0], v[0, 0, 0], rtol=1e-6)  # one key: its value


def test_the_stand_in_catches_a_wrong_merge(monkeypatch):
    """The comparison can fail: a merge kernel that forgets each split's softmax sum is caught."""
    sections = dict(source.sections("metal"))
    right = "sum[r] += weight * PKV_PARTIAL(o_ml[ml + 1]);"
    assert right in sections["merge_splits"]
    sections["merge_splits"] = sections["merge_splits"].replace(right, "sum[r] += weight;")
    monkeypatch.setattr(source, "sections", lambda backend: sections)
    with pytest.raises(AssertionError):
        check("float32", 64, 16, 4, [1, 45], splits=2)
