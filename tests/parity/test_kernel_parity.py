"""The paged decode kernel (CUDA or Metal) against the gather oracle and the spec's split-K reference.

Runs only where MLX's default device is a GPU with a kernel backend (MLX's CUDA build on NVIDIA, or
Metal on Apple silicon); on the CPU (CI) every test here skips with that reason — the CPU suite tests
the split-K reference (`tests/unit/test_split_k.py`), the dispatch logic, and the kernels' sources
run through C++ stand-ins for Metal and CUDA (`tests/unit/test_*_stand_in.py`, which reuse this
module's cases).

Each case writes random K/V into a pool whose blocks are handed out in a shuffled order (fragmented
tables), with ragged lengths that include 1 and lengths that are not a multiple of the block size.
Errors are max |kernel - reference| over the outputs, the reference computed in float32 from the
stored (rounded) K/V. Set PAGEDKV_KERNEL_LOG=path to append each case's error to a log.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

from pagedkv.config import ceil_div
from pagedkv.mlx_backend.kernels import decode as kernel
from pagedkv.spec.split_k import split_k_decode

pytestmark = pytest.mark.skipif(
    kernel.backend() is None,
    reason="needs MLX on a GPU with a kernel backend (CUDA build or Metal); the default device is "
    f"{mx.default_device()} — on the CPU, test_metal_stand_in.py and test_cuda_stand_in.py run "
    "the kernels' sources through C++ stand-ins instead (their arithmetic, not the GPU's)",
)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Against the float32 reference of the stored K/V; the output is rounded to the query dtype once.
TOLERANCE = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


def log(line: str) -> None:
    path = os.environ.get("PAGEDKV_KERNEL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def case(dtype, head_dim, block_size, group, lengths, kv_heads=2, window=None, sinks=False, seed=0):
    """Random paged K/V and queries; returns the kernel inputs and float32 NumPy copies."""
    rng = np.random.default_rng(seed)
    blocks_per_row = [ceil_div(n, block_size) for n in lengths]
    num_blocks = sum(blocks_per_row) + 7
    order = rng.permutation(num_blocks)  # fragmented: each row's blocks are scattered
    tables = np.zeros((len(lengths), max(blocks_per_row)), np.int32)
    taken = 0
    for row, count in enumerate(blocks_per_row):
        tables[row, :count] = order[taken : taken + count]
        taken += count
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_pool = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(DTYPES[dtype])
    v_pool = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(DTYPES[dtype])
    queries = mx.array(
        rng.standard_normal((len(lengths), kv_heads * group, head_dim)).astype(np.float32)
    )
    queries = queries.astype(DTYPES[dtype])
    firsts = [max(0, n - window) if window else 0 for n in lengths]
    bounds = np.array([firsts, lengths], np.int32).T.copy()
    sink_logits = (
        mx.array(rng.standard_normal(kv_heads * group).astype(np.float32)) if sinks else None
    )
    batch = kernel.DecodeBatch(
        mx.array(tables), mx.array(bounds), max(n - f for n, f in zip(lengths, firsts))
    )
    as_np = lambda a: np.array(a.astype(mx.float32))  # noqa: E731
    numpy = (as_np(queries), as_np(k_pool), as_np(v_pool), tables, bounds)
    sinks_np = None if sink_logits is None else as_np(sink_logits)
    return (queries, k_pool, v_pool, batch, sink_logits), numpy, sinks_np


def gather_oracle(queries, k_pool, v_pool, tables, bounds, scale, sinks):
    """Today's portable path: gather the blocks, mask, MLX SDPA (float32)."""
    rows, width = tables.shape
    block_size = k_pool.shape[1]
    k = mx.take(k_pool, mx.array(tables.reshape(-1)), axis=0).astype(mx.float32)
    v = mx.take(v_pool, mx.array(tables.reshape(-1)), axis=0).astype(mx.float32)
    k = k.reshape(rows, width * block_size, *k_pool.shape[2:]).transpose(0, 2, 1, 3)
    v = v.reshape(rows, width * block_size, *v_pool.shape[2:]).transpose(0, 2, 1, 3)
    positions = mx.arange(width * block_size)[None, :]
    visible = (positions >= mx.array(bounds[:, :1])) & (positions < mx.array(bounds[:, 1:]))
    out = mx.fast.scaled_dot_product_attention(
        queries.astype(mx.float32)[:, :, None, :], k, v, scale=scale,
        mask=visible[:, None, None, :], sinks=None if sinks is None else sinks.astype(mx.float32),
    )  # fmt: skip
    return np.array(out[:, :, 0, :])


def check(dtype, head_dim, block_size, group, lengths, splits=None, **kwargs):
    (queries, k_pool, v_pool, batch, sinks), numpy, sinks_np = case(
        dtype, head_dim, block_size, group, lengths, **kwargs
    )
    scale = head_dim**-0.5 * 1.3  # not the default: the scale must reach the kernel
    out = kernel.paged_decode(queries, k_pool, v_pool, batch, scale, sinks, num_splits=splits)
    assert out.dtype == queries.dtype and out.shape == queries.shape
    pass1 = (
        "mma"
        if kernel.plan_for(queries, k_pool, sinks is not None, kernel.backend()).shape.tensor_cores
        else "simt"
    )
    got = np.array(out.astype(mx.float32))
    used = splits or kernel.split_count(
        kernel.Shape(queries.dtype, k_pool.dtype, head_dim, block_size, k_pool.shape[2], group, sinks is not None),
        len(lengths), batch.longest,
    )  # fmt: skip
    spec = split_k_decode(*numpy, scale, used, sinks_np)
    oracle = gather_oracle(queries, k_pool, v_pool, numpy[3], numpy[4], scale, sinks)
    err_spec = float(np.abs(got - spec).max())
    err_oracle = float(np.abs(got - oracle).max())
    log(
        f"{dtype} d{head_dim} bs{block_size} g{group} lengths={lengths} splits={used} {pass1} "
        f"{kwargs} err_spec={err_spec:.2e} err_gather={err_oracle:.2e}"
    )
    assert err_spec <= TOLERANCE[dtype], (err_spec, used)
    assert err_oracle <= TOLERANCE[dtype], (err_oracle, used)


RAGGED = [1, 37, 200, 64, 129]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("head_dim", kernel.HEAD_DIMS)
def test_dtypes_and_head_dims(dtype, head_dim):
    check(dtype, head_dim, 16, 4, RAGGED)


@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_block_sizes_and_gqa(block_size, group):
    check("float16", 128, block_size, group, RAGGED)


@pytest.mark.parametrize("splits", [1, 2, 3, 8, 64])
def test_single_pass_and_split_counts(splits):
    check("float32", 128, 16, 4, [1, 5, 300, 1000], splits=splits)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_window_starts(dtype):
    check(dtype, 128, 16, 4, [1, 10, 100, 700, 1500], window=48)
    check(dtype, 64, 32, 2, [3, 33, 1000], window=1, splits=4)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sinks(dtype):
    check(dtype, 64, 16, 8, RAGGED, sinks=True, kv_heads=1)
    check(dtype, 64, 16, 8, RAGGED, sinks=True, kv_heads=1, splits=1)
    check(dtype, 128, 16, 4, [5, 900], sinks=True, window=128, splits=5)


def test_long_context_and_large_batch():
    check("bfloat16", 128, 16, 4, [4096] * 3 + [2000, 1, 4095], kv_heads=8)
    check("float16", 128, 32, 4, [1024 + i for i in range(32)], kv_heads=8)


def test_mixed_query_and_pool_dtypes():
    """Queries in float32 over a float16 pool (a float32 model on a half-precision store)."""
    (queries, k_pool, v_pool, batch, _), numpy, _ = case("float16", 128, 16, 4, RAGGED)
    queries32 = queries.astype(mx.float32)
    out = kernel.paged_decode(queries32, k_pool, v_pool, batch, 0.1)
    assert out.dtype == mx.float32
    used = kernel.split_count(
        kernel.Shape(mx.float32, mx.float16, 128, 16, 2, 4, False), len(RAGGED), batch.longest
    )
    spec = split_k_decode(np.array(queries32), *numpy[1:], 0.1, used)
    assert float(np.abs(np.array(out) - spec).max()) <= TOLERANCE["float32"] * 10


@pytest.mark.parametrize("splits", [1, 4])
def test_queries_as_mlx_lm_passes_them(splits):
    """`[B, q_heads, 1, D]` in (mlx-lm's decode layout), the same shape out, the same numbers."""
    (queries, k_pool, v_pool, batch, _), _, _ = case("bfloat16", 128, 16, 4, RAGGED)
    flat = kernel.paged_decode(queries, k_pool, v_pool, batch, 0.1, num_splits=splits)
    out = kernel.paged_decode(queries[:, :, None, :], k_pool, v_pool, batch, 0.1, num_splits=splits)
    assert out.shape == (*queries.shape[:2], 1, queries.shape[2])
    assert mx.array_equal(out[:, :, 0, :], flat)


ON_TENSOR_CORES = kernel.backend() == "cuda" and kernel.cuda_arch() >= 80


@pytest.mark.skipif(not ON_TENSOR_CORES, reason="needs an NVIDIA GPU of sm_80 or later (mma)")
def test_the_tensor_core_kernel_runs_exactly_where_it_applies():
    """16-bit pools read by queries of their dtype, head_dim a multiple of 32 up to 128: the mma
    pass 1; every other case keeps the one-lane-per-chunk kernel (the cases above test both)."""

    def pass1(query_dtype, pool_dtype, head_dim):
        queries = mx.zeros((1, 8, head_dim), query_dtype)
        pool = mx.zeros((2, 16, 2, head_dim), pool_dtype)
        return kernel.plan_for(queries, pool, False, "cuda").shape.tensor_cores

    assert pass1(mx.bfloat16, mx.bfloat16, 128) and pass1(mx.float16, mx.float16, 32)
    assert not pass1(mx.float32, mx.float32, 128)  # float32 pools: no 16-bit mma operands
    assert not pass1(mx.float32, mx.float16, 128)  # the queries would be rounded
    assert not pass1(mx.bfloat16, mx.bfloat16, 256)  # more accumulators than registers
    assert not pass1(mx.float16, mx.float16, 80)  # not whole 32-element pieces


@pytest.fixture
def without_tensor_cores(monkeypatch):
    """The GPU as an sm_75 one sees it: every shape on the one-lane-per-chunk kernel."""
    monkeypatch.setattr(kernel, "cuda_arch", lambda: 0)
    monkeypatch.setattr(kernel, "_PLANS", {})


@pytest.mark.skipif(not ON_TENSOR_CORES, reason="needs an NVIDIA GPU of sm_80 or later (mma)")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim, splits", [(64, None), (128, 1), (128, 5)])
def test_16_bit_pools_on_the_kernel_older_gpus_run(without_tensor_cores, dtype, head_dim, splits):
    """On GPUs without mma (and on Metal) 16-bit pools take the one-lane-per-chunk kernel; on this
    GPU the cases above run the mma kernel for them, so this holds the other one to the same."""
    check(dtype, head_dim, 16, 4, RAGGED, splits=splits)
    check(dtype, head_dim, 32, 8, [1, 700, 1500], splits=splits, window=100)


ON_CUDA = kernel.backend() == "cuda"


@pytest.mark.skipif(not ON_CUDA, reason="the single-launch merge is CUDA's (Metal: two launches)")
@pytest.mark.parametrize(
    "dtype, head_dim, group, splits, sinks",
    [("float32", 128, 4, 8, False), ("float16", 128, 8, 64, True), ("bfloat16", 64, 1, 3, False),
     ("bfloat16", 256, 4, 5, True), ("float16", 80, 4, 256, False)],
)  # fmt: skip
def test_one_launch_equals_two_launches_bit_for_bit(
    monkeypatch, dtype, head_dim, group, splits, sinks
):
    """The single launch merges the same partials with the same code as the merge kernel, so its
    output is identical, not merely close (both pass-1 kernels: float32 takes the other one)."""
    (queries, k_pool, v_pool, batch, sink_logits), _, _ = case(
        dtype, head_dim, 16, group, RAGGED + [2000], sinks=sinks
    )
    monkeypatch.setattr(kernel, "ONE_LAUNCH", True)
    one = kernel.prepare(queries, k_pool, batch, 0.1, sinks, splits)
    monkeypatch.setattr(kernel, "ONE_LAUNCH", False)
    two = kernel.prepare(queries, k_pool, batch, 0.1, sinks, splits)
    assert one.one_launch and not two.one_launch
    a, b = one(queries, k_pool, v_pool, sink_logits), two(queries, k_pool, v_pool, sink_logits)
    assert mx.array_equal(a, b)


@pytest.mark.skipif(not ON_CUDA, reason="the single-launch merge is CUDA's (Metal: two launches)")
def test_one_launch_calls_evaluated_together_each_count_on_their_own_counters(monkeypatch):
    """Forty independent calls in one evaluation (MLX's CUDA graph may run them at the same time),
    on two shapes: every output equals the same call evaluated alone."""
    monkeypatch.setattr(kernel, "ONE_LAUNCH", True)
    cases = [case("float16", 128, 16, 4, RAGGED + [3000], seed=s)[0] for s in (1, 2)]
    alone = [kernel.paged_decode(q, k, v, batch, 0.1, num_splits=16) for q, k, v, batch, _ in cases]
    mx.eval(alone)
    together = [
        kernel.paged_decode(q, k, v, batch, 0.1, num_splits=16)
        for _ in range(20)
        for q, k, v, batch, _ in cases
    ]
    mx.eval(together)
    for i, out in enumerate(together):
        assert mx.array_equal(out, alone[i % 2]), i


@pytest.mark.skipif(not ON_CUDA, reason="the single-launch merge is CUDA's (Metal: two launches)")
def test_compiled_calls_replayed_together_each_count_on_their_own_counters(monkeypatch):
    """Under mx.compile the counters are part of the compiled graph; MLX copies them into a fresh
    buffer at every replay (`decode.zero_counters`), so replays evaluated together, which the
    CUDA graph may run at the same time, stay exact; and so do later replays."""
    monkeypatch.setattr(kernel, "ONE_LAUNCH", True)
    (queries, k_pool, v_pool, batch, _), _, _ = case("bfloat16", 128, 16, 4, RAGGED + [1500])
    inputs = [queries * scale for scale in (1.0, 2.0, -0.5)]
    want = [kernel.paged_decode(q, k_pool, v_pool, batch, 0.1, num_splits=6) for q in inputs]
    mx.eval(want)

    @mx.compile
    def attend(q):
        return kernel.paged_decode(q, k_pool, v_pool, batch, 0.1, num_splits=6)

    for _ in range(3):
        got = [attend(q) for q in inputs]
        mx.eval(got)
        for g, w in zip(got, want):
            assert mx.array_equal(g, w)


@pytest.mark.skipif(not ON_CUDA, reason="pools go as one-element views to CUDA kernels only")
@pytest.mark.parametrize(
    "dtype, head_dim, splits, one_launch",
    [("float16", 128, None, False), ("bfloat16", 64, 7, True), ("float32", 96, 1, False)],
)
def test_pools_as_one_element_views_give_the_whole_pools_output_bit_for_bit(
    monkeypatch, dtype, head_dim, splits, one_launch
):
    """decode.POOL_VIEWS: the kernels read a pool through a one-element view of its buffer (so
    MLX counts one element towards ending its CUDA graph). The same pointer, so the same output
    bit for bit, also for pools that are slices of a larger array (the view keeps the offset),
    in one pass, in splits and in the single launch; and calls made together stay exact."""
    (queries, k_pool, v_pool, batch, _), _, _ = case(dtype, head_dim, 16, 4, RAGGED + [900])
    spare = mx.zeros((3, *k_pool.shape[1:]), k_pool.dtype)
    k_sliced = mx.concatenate([spare, k_pool])[3:]  # the pool at an offset into a buffer
    v_sliced = mx.concatenate([spare, v_pool])[3:]
    monkeypatch.setattr(kernel, "ONE_LAUNCH", one_launch)
    monkeypatch.setattr(kernel, "POOL_VIEWS", False)
    whole = kernel.prepare(queries, k_pool, batch, 0.1, False, splits)
    monkeypatch.setattr(kernel, "POOL_VIEWS", True)
    views = kernel.prepare(queries, k_pool, batch, 0.1, False, splits)
    assert views.pool_views and not whole.pool_views
    want = whole(queries, k_pool, v_pool)
    got = [views(queries, k_pool, v_pool), views(queries, k_sliced, v_sliced)]
    got += [views(queries * s, k_pool, v_pool) for s in (1.0, 1.0)]  # evaluated together
    mx.eval(want, got)
    for out in got:
        assert mx.array_equal(out, want)
