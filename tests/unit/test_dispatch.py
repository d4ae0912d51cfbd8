"""Which decode-attention path runs (`pagedkv.mlx_backend.kernels.dispatch`), tested on any device:
the PAGEDKV_ATTENTION switch, the self-check that guards the Metal kernel (correctness and speed),
and that its verdict is taken once per shape. Fake kernels stand in for the real ones."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from pagedkv import Config  # noqa: E402
from pagedkv.errors import ConfigError  # noqa: E402
from pagedkv.mlx_backend import PagedCache  # noqa: E402
from pagedkv.mlx_backend.kernels import decode, dispatch  # noqa: E402

SHAPE = decode.Shape(mx.float16, mx.float16, 128, 16, 8, 4, False)
GOOD = dispatch.Verdict(True, "fine")


def ones():
    return mx.ones((2, 3))


def slow_ones():
    time.sleep(0.002)
    return mx.ones((2, 3))


@pytest.mark.parametrize("value, expected", [(None, "auto"), ("", "auto"), ("GATHER", "gather"), (" kernel ", "kernel")])  # fmt: skip
def test_mode_reads_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(dispatch.ENV, raising=False)
    else:
        monkeypatch.setenv(dispatch.ENV, value)
    assert dispatch.mode() == expected


def test_an_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "fast")
    with pytest.raises(ConfigError, match="PAGEDKV_ATTENTION"):
        dispatch.mode()


def test_self_check_accepts_only_a_kernel_that_matches_and_is_faster():
    assert dispatch.self_check(ones, slow_ones, 1e-3, repeats=3).use_kernel
    wrong = dispatch.self_check(lambda: ones() * 2, slow_ones, 1e-3, repeats=3)
    assert not wrong.use_kernel and "differs" in wrong.reason
    slower = dispatch.self_check(slow_ones, ones, 1e-3, repeats=3)
    assert not slower.use_kernel and "slower" in slower.reason
    nan = dispatch.self_check(lambda: ones() * float("nan"), slow_ones, 1e-3, repeats=3)
    assert not nan.use_kernel

    def broken():
        raise RuntimeError("compile error")

    failed = dispatch.self_check(broken, ones, 1e-3)
    assert not failed.use_kernel and "compile error" in failed.reason


def test_gather_mode_never_uses_the_kernel():
    d = dispatch.Dispatcher()
    for backend in (None, "cuda", "metal"):
        assert not d.use_kernel(SHAPE, lambda: GOOD, backend, chosen="gather")


def test_kernel_mode_uses_it_or_says_why_not():
    d = dispatch.Dispatcher()
    assert d.use_kernel(SHAPE, lambda: pytest.fail("no self-check when forced"), "metal", "kernel")
    with pytest.raises(ConfigError, match="no paged attention kernel"):
        d.use_kernel(SHAPE, lambda: GOOD, None, chosen="kernel")
    odd = decode.Shape(mx.float16, mx.float16, 20, 16, 8, 4, False)  # 40 bytes per row
    with pytest.raises(ConfigError, match="head_dim 20"):
        d.use_kernel(odd, lambda: GOOD, "cuda", chosen="kernel")


def test_auto_on_cuda_uses_the_verified_kernel_without_a_check():
    d = dispatch.Dispatcher()
    assert d.use_kernel(SHAPE, lambda: pytest.fail("CUDA is verified offline"), "cuda", "auto")
    assert not d.use_kernel(SHAPE, lambda: GOOD, None, "auto")  # the CPU: gather
    unsupported = decode.Shape(mx.float16, mx.float16, 300, 16, 8, 4, False)
    assert not d.use_kernel(unsupported, lambda: GOOD, "cuda", "auto")


def test_auto_on_metal_checks_once_per_shape_and_warns_once_on_failure():
    d = dispatch.Dispatcher()
    calls = []

    def failing():
        calls.append(1)
        return dispatch.Verdict(False, "the kernel differs from gather by 0.5")

    with pytest.warns(RuntimeWarning, match="differs from gather"):
        assert not d.use_kernel(SHAPE, failing, "metal", "auto")
    assert not d.use_kernel(SHAPE, failing, "metal", "auto")  # remembered: no second check
    assert len(calls) == 1
    other = decode.Shape(mx.float16, mx.float16, 64, 16, 8, 4, False)
    assert d.use_kernel(other, lambda: GOOD, "metal", "auto")
    assert d.use_kernel(other, failing, "metal", "auto")  # the passed verdict is kept
    assert len(calls) == 1


def test_forcing_the_kernel_without_one_fails_before_any_change(monkeypatch):
    if decode.backend() is not None:
        pytest.skip("this device has a kernel backend; the refusal is for devices without one")
    cache = PagedCache(Config(num_blocks=8, block_size=4, num_kv_heads=2, head_dim=16))
    seq, _ = cache.add_sequence([1, 2, 3])
    before = cache.snapshot()
    monkeypatch.setenv(dispatch.ENV, "kernel")
    with pytest.raises(ConfigError, match="no paged attention kernel"):
        cache.attention_decode(0, [seq], mx.zeros((1, 4, 16)))
    assert cache.snapshot() == before
    monkeypatch.setenv(dispatch.ENV, "gather")
    assert cache.attention_decode(0, [seq], mx.zeros((1, 4, 16))).shape == (1, 4, 16)


def test_decode_batch_bounds_follow_the_window():
    from pagedkv.mlx_backend.attention import decode_batch

    tables = [np.array([3, 1], np.int32), np.array([0], np.int32)]
    batch = decode_batch(tables, [7, 2], window=4)
    assert batch.bounds.tolist() == [[3, 7], [0, 2]]
    assert batch.tables.tolist() == [[3, 1], [0, 0]]
    assert batch.longest == 4
    assert decode_batch(tables, [7, 2], None).longest == 7


@pytest.mark.parametrize(
    "longest, batch, expected",
    [
        (100, 1, 1),  # shorter than one split's minimum: one pass
        (511, 1, 1),
        (2048, 1, 8),  # batch 1: 8 threadblocks per split, splits of 256 keys
        (32768, 1, 64),  # 64 splits x 8 = the target's 512 threadblocks
        (32768, 4, 16),
        (4096, 64, 1),  # 64 rows x 8 kv heads fill the target alone
        (4096, 16, 4),
    ],
)
def test_split_count_fills_the_gpu_with_splits_of_at_least_min_keys(longest, batch, expected):
    assert decode.split_count(SHAPE, batch, longest) == expected


@pytest.mark.parametrize(
    "longest, batch, expected",
    [
        (2048, 1, 8),  # still splits of 256 keys
        (32768, 1, 32),  # 32 splits x 8 = the tensor-core target's 256 threadblocks
        (16384, 4, 8),
        (4096, 16, 2),
        (4096, 32, 1),
    ],
)
def test_the_tensor_core_pass_aims_at_its_own_smaller_wave(longest, batch, expected):
    tensor_cores = dataclasses.replace(SHAPE, tensor_cores=True)
    assert decode.split_count(tensor_cores, batch, longest) == expected


def test_split_count_never_exceeds_max_splits():
    one_head = decode.Shape(mx.float16, mx.float16, 128, 16, 1, 1, False)
    assert decode.split_count(one_head, 1, 10**6) == decode.MAX_SPLITS


def on_a_metal_device(monkeypatch):
    """decode_attention as it runs on an Apple GPU (`auto`, a fresh dispatcher), over a 6-token
    sequence with non-zero K/V (a zero kernel must not match): (cache, seq id, queries)."""
    monkeypatch.setenv(dispatch.ENV, "auto")
    monkeypatch.setattr(dispatch, "DISPATCHER", dispatch.Dispatcher())
    monkeypatch.setattr(decode, "backend", lambda: "metal")
    cache = PagedCache(Config(num_blocks=8, block_size=4, num_kv_heads=2, head_dim=16))
    seq, _ = cache.add_sequence(list(range(6)))
    rows = mx.random.normal((6, 2, 16))
    cache.write_kv(seq, 0, 0, rows, rows + 1)
    return cache, seq, mx.random.normal((1, 4, 16))


def test_backend_attention_wires_the_self_check_on_a_metal_device(monkeypatch):
    """decode_attention as it runs on an Apple GPU, with stand-ins for the Metal kernel: a wrong
    kernel is caught by the self-check on the real inputs (gather used, one warning); a correct,
    faster one is used from then on."""
    from pagedkv.mlx_backend import attention

    cache, seq, queries = on_a_metal_device(monkeypatch)
    monkeypatch.setenv(dispatch.ENV, "gather")
    want = cache.attention_decode(0, [seq], queries)
    monkeypatch.setenv(dispatch.ENV, "auto")

    def slow_gather(*args, **kwargs):
        time.sleep(0.003)
        return original_gather(*args, **kwargs)

    original_gather = attention.gather_decode
    monkeypatch.setattr(attention, "gather_decode", slow_gather)
    calls = []

    def wrong_kernel(q, *args, **kwargs):
        calls.append("wrong")
        return mx.zeros_like(q)

    monkeypatch.setattr(decode, "paged_decode", wrong_kernel)
    monkeypatch.setattr(dispatch, "DISPATCHER", dispatch.Dispatcher())
    with pytest.warns(RuntimeWarning, match="differs from gather"):
        got = cache.attention_decode(0, [seq], queries)
    assert mx.allclose(got, want)  # the wrong kernel's answer was not used
    checked = len(calls)
    cache.attention_decode(0, [seq], queries)  # verdict remembered: no second check
    assert calls == ["wrong"] * checked

    def good_kernel(q, k_pool, v_pool, batch, scale, sinks=None, num_splits=None):
        calls.append("good")
        return original_gather(q, k_pool, v_pool, batch, scale, sinks)

    monkeypatch.setattr(decode, "paged_decode", good_kernel)
    monkeypatch.setattr(dispatch, "DISPATCHER", dispatch.Dispatcher())
    calls.clear()
    assert mx.allclose(cache.attention_decode(0, [seq], queries), want)
    cache.attention_decode(0, [seq], queries)
    assert calls.count("good") >= 2  # used after passing (the check itself calls it too)


def test_cuda_variants_carry_their_template_values_as_constants():
    """The CUDA kernel body declares each template value (a call then passes none): types by the
    names MLX's CUDA build uses, ints and bools as constexpr."""
    text = decode.cuda_constants([("TQ", mx.bfloat16), ("KIND", 1), ("HAS_SINKS", True)])
    assert (
        text
        == "using TQ = __nv_bfloat16;\nconstexpr int KIND = 1;\nconstexpr bool HAS_SINKS = true;\n"
    )
    assert decode.cuda_constants([("TQ", mx.float16)]) == "using TQ = __half;\n"
    assert decode.cuda_constants([("TQ", mx.float32)]) == "using TQ = float;\n"


@pytest.mark.parametrize("forced", [0, -1, decode.MAX_SPLITS + 1])
def test_a_forced_split_count_outside_the_range_is_refused_before_any_work(forced):
    """0 used to fall back to the rule's count silently; now every count outside [1, MAX_SPLITS]
    is a ValueError, raised before a kernel object is built (so it holds on the CPU too)."""
    queries = mx.zeros((2, 32, 128), mx.float16)
    k_pool = mx.zeros((10, 16, 8, 128), mx.float16)
    batch = decode.DecodeBatch(mx.zeros((2, 4), mx.int32), mx.array([[0, 5], [0, 7]]), 7)
    with pytest.raises(ValueError, match=f"num_splits must be in \\[1, {decode.MAX_SPLITS}\\]"):
        decode.prepare(queries, k_pool, batch, 0.1, False, forced, "cuda")


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_the_query_tile_divides_the_group_and_its_merge_buffer_fits(dtype):
    """The pass-1 kernels merge their lane groups through `sm_acc[NSG][QT][D]`, `sm_m[NSG][QT]`
    and `sm_l[NSG][QT]` floats: that must fit MERGE_BUFFER_BYTES, which must fit Metal's 32 KiB
    of threadgroup memory, for every shape the kernel covers."""
    assert decode.MERGE_BUFFER_BYTES <= 32 * 1024
    for head_dim in decode.HEAD_DIMS:
        if decode.supported(head_dim, dtype, dtype):
            continue
        for group in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16):
            shape = decode.Shape(dtype, dtype, head_dim, 16, 2, group, False)
            tile = shape.query_tile
            assert group % tile == 0, (head_dim, group, tile)
            merge_bytes = shape.lane_groups * tile * (head_dim + 2) * 4
            assert merge_bytes <= decode.MERGE_BUFFER_BYTES, (dtype, head_dim, group, tile)


def test_the_tensor_core_kernel_covers_16_bit_pools_of_the_queries_dtype():
    """paged_decode_mma.cu: 16-bit operands as stored, 32-element pieces, at most 128 (registers)."""
    covered = decode.tensor_core_shape
    for dtype in (mx.float16, mx.bfloat16):
        assert all(covered(d, dtype, dtype) for d in (32, 64, 96, 128))
        assert not any(covered(d, dtype, dtype) for d in (16, 80, 160, 256))
        assert not covered(128, dtype, mx.float32)  # rounding the queries would change results
    assert not covered(128, mx.float32, mx.float32)
    assert not covered(128, mx.float16, mx.bfloat16)


@pytest.mark.parametrize(
    "info, expected",
    [
        ({"architecture": "sm_90"}, 90),
        ({"architecture": "sm_120", "compute_capability_major": 12}, 120),
        ({"compute_capability_major": 8, "compute_capability_minor": 6}, 86),
        ({"architecture": "apple-gpu"}, 0),
        ({}, 0),  # unknown: no tensor-core kernel, the one that runs everywhere
        ({"compute_capability_major": 9}, 0),  # half an answer: unknown
        ({"architecture": "sm_"}, 0),
        # a suffixed architecture (sm_90a on some builds): the compute capability decides
        (
            {
                "architecture": "sm_90a",
                "compute_capability_major": 9,
                "compute_capability_minor": 0,
            },
            90,
        ),
    ],
)
def test_cuda_arch_reads_the_device_info(monkeypatch, info, expected):
    monkeypatch.setattr(decode.mx, "device_info", lambda: info)
    decode.cuda_arch.cache_clear()
    try:
        assert decode.cuda_arch() == expected
    finally:
        decode.cuda_arch.cache_clear()


def test_cuda_arch_is_unknown_on_an_mlx_without_device_info(monkeypatch):
    monkeypatch.delattr(decode.mx, "device_info")
    decode.cuda_arch.cache_clear()
    try:
        assert decode.cuda_arch() == 0
    finally:
        decode.cuda_arch.cache_clear()


def test_a_tensor_core_shape_serves_its_whole_group_up_to_8_queries_and_names_its_variant():
    for group, tile in ((1, 1), (4, 4), (6, 6), (8, 8), (12, 6), (16, 8), (7, 7)):
        shape = decode.Shape(mx.bfloat16, mx.bfloat16, 128, 16, 2, group, False, True)
        assert shape.query_tile == tile
    tc = decode.Shape(mx.bfloat16, mx.bfloat16, 128, 16, 2, 4, False, True)
    simt = decode.Shape(mx.bfloat16, mx.bfloat16, 128, 16, 2, 4, False)
    assert "_mma" in tc.name("split") and "_mma" not in simt.name("split")
    assert tc.name("reduce") == simt.name("reduce")  # the same merge kernel


def test_plans_take_pass_1_from_the_tensor_core_source_only_where_it_applies(monkeypatch):
    """Which source each kernel object of a CUDA plan is built from, with kernel building faked
    (no GPU here): the mma pass 1 on sm_80+ for covered shapes (also in the single launch),
    never for the merge kernel."""
    built = []
    monkeypatch.setattr(
        decode, "_kernel", lambda backend, name, part, constants="": built.append((backend, part))
    )
    monkeypatch.setattr(decode, "_PLANS", {})
    queries, pool = mx.zeros((1, 8, 128), mx.bfloat16), mx.zeros((2, 16, 2, 128), mx.bfloat16)
    for arch, pass1 in ((90, "cuda_mma"), (80, "cuda_mma"), (75, "cuda"), (0, "cuda")):
        monkeypatch.setattr(decode, "cuda_arch", lambda arch=arch: arch)
        decode._PLANS.clear()
        built.clear()
        decode.Plan.of.cache_clear()
        plan = decode.plan_for(queries, pool, False, "cuda")
        assert built == [(pass1, "final"), (pass1, "split"), ("cuda", "reduce"), (pass1, "once")]
        assert plan.shape.tensor_cores == (pass1 == "cuda_mma")
        assert ("L", plan.shape.lanes) not in plan.template  # CUDA bakes values into the source
    built.clear()
    decode.plan_for(queries.astype(mx.float32), pool.astype(mx.float32), False, "cuda")
    assert built[0] == ("cuda", "final")  # float32: the one-lane-per-chunk kernel on any GPU
    decode.Plan.of.cache_clear()


def test_the_choice_is_remembered_per_setting_and_shape(monkeypatch):
    """decode_attention remembers its choice per ($PAGEDKV_ATTENTION, dtypes, heads, head_dim,
    block size, kv heads, sinks): a changed setting or any other shape decides again, and on a
    Metal device each shape gets its own self-check, keyed by exactly that shape."""
    from pagedkv.mlx_backend import attention

    kernel_calls, checks = [], []

    def fake_kernel(q, k_pool, v_pool, batch, scale, sinks=None):
        kernel_calls.append(q.shape)
        return attention.gather_decode(q, k_pool, v_pool, batch, scale, sinks)

    def fake_check(kernel, gather, tolerance, repeats=20, forms=None):
        checks.append(tolerance)
        return GOOD

    monkeypatch.setattr(decode, "paged_decode", fake_kernel)
    monkeypatch.setattr(dispatch, "self_check", fake_check)
    monkeypatch.setattr(dispatch, "DISPATCHER", dispatch.Dispatcher())
    monkeypatch.setattr(decode, "backend", lambda: "cuda")
    batch = decode.DecodeBatch(mx.zeros((1, 1), mx.int32), mx.array([[0, 3]]), 3)

    def attend(q_heads=4, head_dim=64, block=16, kv_heads=2, sinks=None):
        queries = mx.ones((1, q_heads, head_dim), mx.float16)
        pool = mx.ones((2, block, kv_heads, head_dim), mx.float16)
        attention.decode_attention(queries, pool, pool, batch, 0.1, sinks)

    monkeypatch.setenv(dispatch.ENV, "auto")
    attend()
    assert len(kernel_calls) == 1  # CUDA: the verified kernel, no self-check
    monkeypatch.setenv(dispatch.ENV, "gather")
    attend()
    assert len(kernel_calls) == 1  # the setting changed: decided again
    monkeypatch.setenv(dispatch.ENV, "auto")
    attend(head_dim=12)  # 24-byte rows: not covered, gather
    assert len(kernel_calls) == 1
    attend(q_heads=2, kv_heads=2, head_dim=64)
    assert len(kernel_calls) == 2 and checks == []

    monkeypatch.setattr(decode, "backend", lambda: "metal")
    monkeypatch.setattr(dispatch, "DISPATCHER", dispatch.Dispatcher())
    variants = [{}, {"block": 8}, {"kv_heads": 1}, {"sinks": mx.zeros(4)}, {"q_heads": 8}]
    for kwargs in variants + variants:  # the second round is remembered: no new check
        attend(**kwargs)
    assert len(checks) == len(variants)
    want = {
        ("metal", decode.Shape(mx.float16, mx.float16, 64, 16, 2, 2, False)),
        ("metal", decode.Shape(mx.float16, mx.float16, 64, 8, 2, 2, False)),
        ("metal", decode.Shape(mx.float16, mx.float16, 64, 16, 1, 4, False)),
        ("metal", decode.Shape(mx.float16, mx.float16, 64, 16, 2, 2, True)),
        ("metal", decode.Shape(mx.float16, mx.float16, 64, 16, 2, 4, False)),
    }
    assert set(dispatch.DISPATCHER.verdicts) == want


def test_self_check_rejects_a_kernel_wrong_in_any_of_its_forms():
    """Every form must match gather; only the kernel's own launch is timed."""
    forms = {"1 split": ones, "2 splits": lambda: ones() * 2}
    verdict = dispatch.self_check(ones, slow_ones, 1e-3, repeats=3, forms=forms)
    assert not verdict.use_kernel and "(2 splits) differs" in verdict.reason
    timed = []

    def slow_form():
        timed.append(1)
        time.sleep(0.01)
        return ones()

    verdict = dispatch.self_check(ones, slow_ones, 1e-3, repeats=3, forms={"2 splits": slow_form})
    assert verdict.use_kernel and len(timed) == 1  # checked once, never timed


def test_the_metal_self_check_runs_every_form_a_later_call_can_launch(monkeypatch):
    """A 6-token first call gets one split from the rule; the verdict also covers the splits and
    merge kernel that longer contexts launch later, so the check runs those forms too: a kernel
    right in one pass but wrong when split is refused."""
    from pagedkv.mlx_backend import attention

    cache, seq, queries = on_a_metal_device(monkeypatch)
    original_gather = attention.gather_decode
    asked = []

    def slow_gather(*args, **kwargs):
        time.sleep(0.003)
        return original_gather(*args, **kwargs)

    def wrong_when_split(q, k_pool, v_pool, batch, scale, sinks=None, num_splits=None):
        asked.append(num_splits)
        out = original_gather(q, k_pool, v_pool, batch, scale, sinks)
        splits = num_splits or decode.split_count(SHAPE, 1, batch.longest)
        return out if splits == 1 else out + 1

    monkeypatch.setattr(attention, "gather_decode", slow_gather)
    monkeypatch.setattr(decode, "paged_decode", wrong_when_split)
    with pytest.warns(RuntimeWarning, match=r"\(2 splits\) differs from gather"):
        cache.attention_decode(0, [seq], queries)
    assert set(asked) == {None, *dispatch.CHECKED_SPLITS}
    assert dispatch.CHECKED_SPLITS == (1, 2, decode.MAX_SPLITS) and decode.MAX_SPLITS > 128
