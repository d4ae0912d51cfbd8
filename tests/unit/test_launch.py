"""How the paged decode kernel is launched (`pagedkv.mlx_backend.kernels.decode`), tested on any
device with fake kernel objects: the lane geometry, the split count when a threadblock serves
part of a query group, which kernels a call runs with which grids, inputs and outputs, and that
every kernel object is built with the names its source uses. The kernels' arithmetic is the GPU
parity suite's (tests/parity/test_kernel_parity.py); what is decided on the host is tested here."""

from __future__ import annotations

import re

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from pagedkv.mlx_backend.kernels import decode, dispatch, source  # noqa: E402

THREADS = decode.THREADS


@pytest.mark.parametrize(
    "dtype, head_dim, lanes, unroll",
    [
        (mx.float16, 128, 16, 4),  # 256-byte rows: 16 chunks of 16 bytes, one per lane
        (mx.bfloat16, 64, 8, 4),
        (mx.float16, 80, 16, 4),  # 10 chunks: the next power of two, 6 lanes idle
        (mx.bfloat16, 16, 2, 4),
        (mx.float32, 128, 32, 4),  # 32 chunks: a whole warp per row
        (mx.float32, 256, 32, 2),  # 64 chunks: 32 lanes, 2 chunks each, fewer keys in flight
        (mx.float16, 256, 32, 4),
    ],
)
def test_lanes_cover_a_key_row_in_16_byte_pieces(dtype, head_dim, lanes, unroll):
    """L lanes read one K/V row: the smallest power of two >= its 16-byte chunks, at most a warp
    (32); a threadblock holds 128 / L lane groups; a lane with one chunk keeps 4 keys in flight,
    one with two keeps 2 (registers)."""
    shape = decode.Shape(dtype, dtype, head_dim, 16, 8, 4, False)
    assert shape.lanes == lanes
    assert shape.lane_groups == THREADS // lanes
    assert shape.unroll == unroll
    chunks = head_dim * dtype.size // 16
    assert lanes * -(-chunks // lanes) >= chunks  # every chunk has a lane


def test_split_count_counts_threadblocks_per_query_tile():
    """float32 at head_dim 256 with 8 queries per kv head: the merge buffer holds a tile of 4, so
    each kv head takes two threadblocks per split and half as many splits fill the GPU."""
    shape = decode.Shape(mx.float32, mx.float32, 256, 16, 8, 8, False)
    assert shape.query_tile == 4
    per_split = 8 * 2  # kv heads x tiles, batch 1
    assert decode.split_count(shape, 1, 32768) == decode.TARGET_BLOCKS // per_split
    full_group = decode.Shape(mx.float32, mx.float32, 128, 16, 8, 8, False)
    assert full_group.query_tile == 8
    assert decode.split_count(full_group, 1, 32768) == decode.TARGET_BLOCKS // 8


def test_a_kernel_name_is_unique_per_variant():
    """MLX caches compiled kernels by name: two variants under one name would run the first's
    code for both."""
    base = decode.Shape(mx.float16, mx.float16, 128, 16, 8, 4, False)
    variants = [
        base,
        decode.Shape(mx.bfloat16, mx.float16, 128, 16, 8, 4, False),
        decode.Shape(mx.float16, mx.bfloat16, 128, 16, 8, 4, False),
        decode.Shape(mx.float32, mx.float32, 128, 16, 8, 4, False),
        decode.Shape(mx.float16, mx.float16, 64, 16, 8, 4, False),
        decode.Shape(mx.float16, mx.float16, 128, 32, 8, 4, False),
        decode.Shape(mx.float16, mx.float16, 128, 16, 4, 4, False),
        decode.Shape(mx.float16, mx.float16, 128, 16, 8, 2, False),
        decode.Shape(mx.float16, mx.float16, 128, 16, 8, 4, True),
        decode.Shape(mx.float16, mx.float16, 128, 16, 8, 4, False, True),
    ]
    for part in ("final", "split"):
        names = [v.name(part) for v in variants]
        assert len(set(names)) == len(names), names
    assert len({base.name(p) for p in ("final", "split", "reduce")}) == 3


def test_the_query_tile_is_the_largest_that_divides_the_group_and_fits():
    for dtype in (mx.float32, mx.float16):
        for head_dim in (64, 128, 256):
            for group in (1, 2, 4, 6, 8, 9, 12, 16):
                shape = decode.Shape(dtype, dtype, head_dim, 16, 2, group, False)
                per_query = shape.lane_groups * (head_dim + 2) * 4  # sm_acc, sm_m, sm_l floats
                fits = [
                    t
                    for t in range(1, 9)
                    if group % t == 0 and t * per_query <= decode.MERGE_BUFFER_BYTES
                ]
                assert shape.query_tile == max(fits), (dtype, head_dim, group)


class FakeKernel:
    """A kernel object that records its calls and returns zeros of the asked shapes."""

    def __init__(self, part: str, calls: list, name: str = "", constants: str = ""):
        self.part, self.calls, self.name, self.constants = part, calls, name, constants

    def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        self.calls.append(
            dict(part=self.part, name=self.name, constants=self.constants, inputs=inputs,
                 grid=grid, threadgroup=threadgroup, shapes=[tuple(s) for s in output_shapes],
                 dtypes=list(output_dtypes))
        )  # fmt: skip
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]


@pytest.fixture
def calls(monkeypatch):
    recorded: list[dict] = []
    monkeypatch.setattr(decode, "_PLANS", {})
    monkeypatch.setattr(decode, "cuda_arch", lambda: 90)
    monkeypatch.setattr(
        decode,
        "_kernel",
        lambda backend, name, part, constants="": FakeKernel(part, recorded, name, constants),
    )
    decode.Plan.of.cache_clear()
    yield recorded
    decode.Plan.of.cache_clear()


def inputs(rows: int = 3, q_heads: int = 8, kv_heads: int = 2, longest: int = 600):
    queries = mx.ones((rows, q_heads, 1, 64), mx.float16)  # as mlx-lm passes them
    k_pool = mx.ones((20, 16, kv_heads, 64), mx.float16)
    bounds = mx.array([[0, longest], [0, 5], [1, 40]][:rows], mx.int32)
    batch = decode.DecodeBatch(mx.zeros((rows, 38), mx.int32), bounds, longest)
    return queries, k_pool, batch


def test_one_split_is_one_launch_of_the_final_pass(calls):
    queries, k_pool, batch = inputs(longest=200)  # shorter than a split's minimum
    out = decode.paged_decode(queries, k_pool, k_pool, batch, 0.125, backend_name="cuda")
    (call,) = calls
    assert call["part"] == "final"
    assert call["grid"] == (THREADS, 2, 3)  # one split x (kv heads x tiles) x rows
    assert call["threadgroup"] == (THREADS, 1, 1)
    assert call["shapes"] == [(3, 8, 1, 64)] and call["dtypes"] == [mx.float16]
    assert out.shape == queries.shape and out.dtype == queries.dtype
    assert not call["name"].endswith("_sinks")
    q, k, v, tables, bounds, scale, sinks = call["inputs"]
    assert q is queries and k is k_pool and v is k_pool
    assert tables is batch.tables and bounds is batch.bounds
    assert scale.tolist() == [0.125] and scale.dtype == mx.float32
    assert sinks.tolist() == [0.0] and sinks.dtype == mx.float32  # no sinks: one unused float


def test_several_splits_merge_in_the_same_launch_on_cuda(calls, monkeypatch):
    monkeypatch.setattr(decode, "ONE_LAUNCH", True)
    queries, k_pool, batch = inputs(longest=600)
    sinks = mx.array([0.5] * 8, mx.bfloat16)
    out = decode.paged_decode(queries, k_pool, k_pool, batch, 0.125, sinks, backend_name="cuda")
    (call,) = calls
    splits = decode.split_count(decode.plan_for(queries, k_pool, True, "cuda").shape, 3, 600)
    assert splits == 2 and call["part"] == "once" and call["name"].endswith("_sinks")
    assert "constexpr int MAX_SPLITS = 256;" in call["constants"]  # the merge's weight buffer
    assert call["grid"] == (splits * THREADS, 2, 3) and call["threadgroup"] == (THREADS, 1, 1)
    assert call["shapes"] == [(24, splits, 64), (24, splits, 2), (3, 8, 1, 64)]
    assert call["dtypes"] == [mx.float32, mx.float32, mx.float16]
    *pass1, arrivals = call["inputs"]
    assert pass1[-1].tolist() == [0.5] * 8 and pass1[-1].dtype == mx.float32
    assert arrivals.dtype == mx.int32 and arrivals.tolist() == [0] * (3 * 2 + 1)  # rows x kv heads
    assert out.shape == queries.shape and out.dtype == mx.float16


def test_each_single_launch_counts_on_its_own_copy_of_zeros(calls, monkeypatch):
    """The counters are a broadcast view (strides 0) that MLX must copy for a kernel taking
    row-contiguous inputs, so each launch gets a fresh zeroed buffer; never one element (that
    would pass as contiguous and be shared)."""
    monkeypatch.setattr(decode, "ONE_LAUNCH", True)
    queries, k_pool, batch = inputs(rows=1, longest=600)
    queries, k_pool = queries[:, :2], k_pool[:, :, :1]  # 1 kv head x 1 tile: 1 counter
    decode.paged_decode(queries, k_pool, k_pool, batch, 0.1, backend_name="cuda")
    *_, arrivals = calls[0]["inputs"]
    assert arrivals.shape == (2,) and arrivals.tolist() == [0, 0]
    assert decode.zero_counters(1) is arrivals  # one view per count, built once
    view = decode.zero_counters(6)
    assert view.shape == (7,) and view.dtype == mx.int32 and not any(view.tolist())
    assert mx.array_equal(mx.contiguous(view), mx.zeros((7,), mx.int32))


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_several_splits_write_partials_that_the_reduce_kernel_merges(calls, backend, monkeypatch):
    """Metal always; CUDA as shipped (ONE_LAUNCH off): pass 1, then the merge kernel. Metal
    merges this way even with ONE_LAUNCH on."""
    monkeypatch.setattr(decode, "ONE_LAUNCH", backend == "metal")
    queries, k_pool, batch = inputs(longest=600)
    sinks = mx.array([0.5] * 8, mx.bfloat16)
    out = decode.paged_decode(queries, k_pool, k_pool, batch, 0.125, sinks, backend_name=backend)
    split, reduce = calls
    splits = decode.split_count(decode.plan_for(queries, k_pool, True, backend).shape, 3, 600)
    assert splits == 2  # 600 keys: two splits of at least MIN_SPLIT_KEYS
    assert split["part"] == "split" and reduce["part"] == "reduce"
    assert split["name"].endswith("_sinks") and reduce["name"].endswith("_sinks")
    assert split["threadgroup"] == reduce["threadgroup"] == (THREADS, 1, 1)
    assert split["grid"] == (splits * THREADS, 2, 3)
    assert split["shapes"] == [(3 * 8, splits, 64), (3 * 8, splits, 2)]  # o_acc, (m, l)
    assert split["dtypes"] == [mx.float32, mx.float32]
    assert split["inputs"][-1].dtype == mx.float32  # sinks reach the kernel as float32
    assert reduce["grid"] == (3 * 8 * THREADS, 1, 1)  # one threadblock per query row
    o_acc, o_ml, reduce_sinks = reduce["inputs"]
    assert (o_acc.shape, o_ml.shape) == ((24, splits, 64), (24, splits, 2))
    assert reduce_sinks.tolist() == [0.5] * 8
    assert reduce["shapes"] == [(3, 8, 1, 64)] and out.dtype == mx.float16


def test_a_partial_query_tile_doubles_the_threadblocks_per_kv_head(calls):
    queries = mx.ones((2, 16, 256), mx.float32)  # 2 kv heads x 8 queries, tile 4
    k_pool = mx.ones((8, 16, 2, 256), mx.float32)
    batch = decode.DecodeBatch(mx.zeros((2, 2), mx.int32), mx.array([[0, 20], [0, 9]]), 20)
    decode.paged_decode(queries, k_pool, k_pool, batch, 0.1, backend_name="cuda")
    assert calls[0]["grid"] == (THREADS, 2 * 2, 2)


def test_cuda_constants_follow_the_pass_1_source(calls):
    """The tensor-core pass 1 has no lanes or keys in flight; the other declares both."""
    for pool in (mx.ones((4, 16, 2, 64), mx.float16), mx.ones((4, 16, 2, 64), mx.float32)):
        queries = mx.ones((1, 4, 64), pool.dtype)
        batch = decode.DecodeBatch(mx.zeros((1, 1), mx.int32), mx.array([[0, 3]]), 3)
        decode.paged_decode(queries, pool, pool, batch, 0.1, backend_name="cuda")
    mma, simt = calls
    shape = decode.Shape(mx.float32, mx.float32, 64, 16, 2, 2, False)
    assert "_mma_" in mma["name"] and "_mma_" not in simt["name"]
    for name in ("L", "U"):
        assert f"constexpr int {name} =" not in mma["constants"]
    assert f"constexpr int L = {shape.lanes};" in simt["constants"]
    assert f"constexpr int U = {shape.unroll};" in simt["constants"]


@pytest.mark.parametrize("one_launch", [False, True])
@pytest.mark.parametrize("forced", [1, 5, decode.MAX_SPLITS])
def test_a_forced_split_count_is_the_launch_grid(calls, forced, one_launch, monkeypatch):
    monkeypatch.setattr(decode, "ONE_LAUNCH", one_launch)
    queries, k_pool, batch = inputs()
    launch = decode.prepare(queries, k_pool, batch, 0.1, False, forced, "cuda")
    assert launch.splits == forced
    assert launch.one_launch == (one_launch and forced > 1)  # one split has nothing to merge
    launch(queries, k_pool, k_pool)
    assert calls[0]["grid"] == (forced * THREADS, 2, 3)
    several = ["once"] if one_launch else ["split", "reduce"]
    assert [c["part"] for c in calls] == (["final"] if forced == 1 else several)


def test_a_prepared_launch_serves_every_layer_of_the_step(calls):
    """decode.prepare once per step; each layer's call passes that layer's queries and pools
    with the step's tables, bounds and scale."""
    queries, k_pool, batch = inputs(longest=100)
    launch = decode.prepare(queries, k_pool, batch, 0.2, False, backend_name="cuda")
    other_q, other_pool = queries + 1, k_pool + 1
    launch(queries, k_pool, k_pool)
    launch(other_q, other_pool, other_pool)
    first, second = calls
    assert second["inputs"][0] is other_q and second["inputs"][1] is other_pool
    assert all(a is b for a, b in zip(first["inputs"][3:6], second["inputs"][3:6]))


def test_a_layer_written_in_place_is_read_through_the_tables_its_write_returned(calls):
    """An in-place write returns a copy of the step's tables (kernels/write.py); the layer's
    kernel call takes that copy in the tables' place, the only edge ordering it after the write."""
    queries, k_pool, batch = inputs(longest=100)
    launch = decode.prepare(queries, k_pool, batch, 0.2, False, backend_name="cuda")
    written = mx.array(np.array(batch.tables))  # what a write would return
    launch(queries, k_pool, k_pool, None, written)
    launch(queries, k_pool, k_pool)
    ordered, plain = calls
    assert ordered["inputs"][3] is written and plain["inputs"][3] is batch.tables
    assert all(a is b for a, b in zip(ordered["inputs"][4:6], plain["inputs"][4:6]))


KERNEL_OBJECTS = [
    (backend, part)
    for backend in ("cuda", "cuda_mma", "metal")
    for part in ("final", "split", "reduce", "once")
    if (backend, part) != ("cuda_mma", "reduce")  # the merge kernel is built from paged_decode.cu
    and (backend, part) != ("metal", "once")  # Metal merges with a second launch
]


@pytest.mark.parametrize("backend, part", KERNEL_OBJECTS)
def test_each_kernel_object_is_built_with_the_names_its_source_uses(monkeypatch, backend, part):
    """The input and output names a kernel object declares are the ones its body reads and
    writes: an output the body writes undeclared fails only at compile time on a GPU, a declared
    one it never writes returns garbage. Kernel building is faked (no GPU here); the sources are
    the shipped ones. The one declared input a body may leave unread: the split pass's sinks
    (both passes share one input list; the sinks enter where the splits merge)."""
    built = {}

    def fake_make(**kwargs):
        built.update(kwargs)
        return object()

    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_make)
    monkeypatch.setattr(mx.fast, "metal_kernel", fake_make)
    decode._kernel.cache_clear()
    try:
        decode._kernel(backend, f"test_{backend}_{part}", part)
    finally:
        decode._kernel.cache_clear()
    if part == "reduce":
        want_in, want_out = ["o_acc", "o_ml", "sinks"], ["out"]
    else:
        want_in = ["queries", "k_pool", "v_pool", "tables", "bounds", "scale", "sinks"]
        want_out = {"split": ["o_acc", "o_ml"], "once": ["o_acc", "o_ml", "out"]}.get(part, ["out"])
        want_in += ["arrivals"] if part == "once" else []
    assert built["input_names"] == want_in and built["output_names"] == want_out
    assert built["name"] == f"test_{backend}_{part}"
    words = set(re.findall(r"\w+", built["source"]))  # the body (header helpers name their own)
    for name in want_in + want_out:
        if (part, name) != ("split", "sinks"):
            assert name in words, (backend, part, name)
    for unused in {"o_acc", "o_ml", "out"} - set(want_out) - set(want_in):
        assert unused not in words, (backend, part, unused)  # would write an undeclared output
    assert built["header"] == source.sections(backend)["header"]


def test_supported_names_what_the_kernel_does_not_cover():
    assert decode.supported(128, mx.float16, mx.float16) is None
    assert "dtype" in decode.supported(128, mx.float16, mx.int32)
    assert "dtype" in decode.supported(128, mx.int8, mx.float16)
    assert "head_dim 264" in decode.supported(264, mx.float32, mx.float32)  # 16-byte rows, > 256
    assert "head_dim 12" in decode.supported(12, mx.float16, mx.float16)  # 24-byte rows
    for head_dim in decode.HEAD_DIMS:  # every size the GPU parity suite runs, up to 256
        assert decode.supported(head_dim, mx.float32, mx.bfloat16) is None


def test_a_decode_step_prepares_one_call_per_kind_of_layer(monkeypatch):
    """`DecodeStep.attend`: every layer of a step asks; the path is chosen and the launch
    prepared once per (window, query dtype, heads, scale, sinks or not), then reused."""
    from pagedkv.mlx_lm import step as step_module

    prepared = []

    def fake_decode_call(queries, k_pool, v_pool, batch, scale, sinks, setting):
        prepared.append((queries.dtype, queries.shape[1], scale, sinks is not None, batch))
        return lambda queries, k_pool, v_pool, sinks=None, tables=None: queries

    monkeypatch.setattr(step_module, "decode_call", fake_decode_call)
    step = step_module.DecodeStep.build(3, [0], True, [np.array([5, 2], np.int32)], [20], 16)
    assert step.slots == (2, 4) and step.lengths == (21,)
    q8, q16, pool = mx.ones((1, 8, 1, 64)), mx.ones((1, 16, 1, 64)), mx.ones((6, 16, 2, 64))
    calls = [
        (q8, None, 0.125, None),
        (q8, None, 0.125, None),  # the same kind: reused
        (q16, None, 0.125, None),
        (q8.astype(mx.float16), None, 0.125, None),
        (q8, None, 0.125, mx.zeros(8)),
        (q8, None, 0.5, None),
        (q8, 8, 0.125, None),
        (q8, 8, 0.125, None),
    ]
    for queries, window, scale, sinks in calls:
        assert step.attend(queries, pool, pool, window, scale, sinks, step.tables) is queries
    assert len(prepared) == 6
    assert prepared[-1][-1] is step.batch(8) and prepared[0][-1] is step.batch(None)
    assert step.batch(8).bounds.tolist() == [[13, 21]] and step.batch(8).longest == 8
    assert step.batch(None).bounds.tolist() == [[0, 21]] and step.batch(None).longest == 21
    assert step.batch(64).bounds.tolist() == [[0, 21]]  # a window longer than the row


def test_a_decode_step_reads_through_the_tables_a_layer_hands_it(monkeypatch):
    """`DecodeStep.attend` passes the layer's tables to the call, and the first layer of a kind
    prepares (and so self-checks) with them; the in-place slots are block * block_size + row."""
    from pagedkv.mlx_lm import step as step_module

    seen = []

    def fake_decode_call(queries, k_pool, v_pool, batch, scale, sinks, setting):
        seen.append(batch.tables)
        return lambda queries, k_pool, v_pool, sinks=None, tables=None: tables

    monkeypatch.setattr(step_module, "decode_call", fake_decode_call)
    tables = [np.array([5, 2], np.int32), np.array([7], np.int32)]
    step = step_module.DecodeStep.build(3, [0, 1], True, tables, [20, 3], 16, in_place=True)
    assert step.flat == (2 * 16 + 4, 7 * 16 + 3) and step.flat_slots().tolist() == [36, 115]
    assert step.flat_slots() is step.flat_slots()  # built once per step
    assert step.in_place is False  # no CUDA GPU here: the kernel's device decides too
    q, pool = mx.ones((2, 8, 1, 64)), mx.ones((9, 16, 2, 64))
    written, later = mx.array(np.array(step.tables)), mx.array(np.array(step.tables))
    assert step.attend(q, pool, pool, None, 0.125, None, written) is written
    assert step.attend(q, pool, pool, None, 0.125, None, later) is later  # prepared once
    assert len(seen) == 1 and seen[0] is written and step.batch(None).tables is step.tables


def test_a_step_call_with_sinks_prepares_the_sinks_variant(calls, monkeypatch):
    from pagedkv.mlx_backend import attention

    monkeypatch.setattr(decode, "backend", lambda: "cuda")
    monkeypatch.setattr(dispatch, "DISPATCHER", dispatch.Dispatcher())
    monkeypatch.setenv(dispatch.ENV, "auto")
    queries, k_pool, batch = inputs(longest=100)
    for sinks in (None, mx.zeros(8)):
        call = attention.decode_call(queries, k_pool, k_pool, batch, 0.1, sinks)
        assert call.plan.shape.has_sinks == (sinks is not None)
        call(queries, k_pool, k_pool, sinks)
    assert [c["name"].endswith("_sinks") for c in calls] == [False, True]
