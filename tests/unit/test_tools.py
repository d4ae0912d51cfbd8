"""The kernel measurement tools' own logic that runs anywhere: argument parsing, ncu report
attribution, and what each tool builds and checks before it times anything."""

import pytest

from tests.tool_modules import load, report, row

ncu_decode = load("ncu_decode")


def test_cells_and_variants_parse_or_fail_clearly():
    assert ncu_decode.parse_cells("2048x1,32768x16") == [(2048, 1), (32768, 16)]
    assert ncu_decode.parse_variants("U4QT4,U2QT1L8") == [(4, 4, None), (2, 1, 8)]
    for bad in ("2048", "0x1", "2048x", "ax1"):
        with pytest.raises(ValueError, match="CONTEXTxBATCH"):
            ncu_decode.parse_cells(bad)
    for bad in ("U4", "U9QT4", "U4QT3", "u4qt4", "U4QT4L5", "U4QT4L"):
        with pytest.raises(ValueError, match="U<1-8>QT"):
            ncu_decode.parse_variants(bad)


def test_bad_arguments_are_usage_errors(capsys):
    for argv in (["2048"], ["--splits", "0"], ["--splits", "8,x"], ["--variants", "U4QT3"]):
        with pytest.raises(SystemExit) as exit_:
            ncu_decode.main(argv)
        assert exit_.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_every_kernel_is_charged_to_the_call_its_marker_opened():
    m = ncu_decode.MARKER
    rows = report(
        row(m, "(1, 1, 1)", "999"),  # the marker's own time is not charged
        row("split", "(8, 8, 1)", "20,000"),
        row("merge", "(32, 1, 1)", "4,000"),
        row(m, "(2, 1, 1)", "999"),
        row("sdpa", "(16, 8, 1)", "10,000"),
        row(m, "(1, 1, 1)", "999"),  # second repetition
        row("split", "(8, 8, 1)", "30,000"),
        row("merge", "(32, 1, 1)", "2,000"),
        row(m, "(2, 1, 1)", "999"),
        row("sdpa", "(16, 8, 1)", "12,000"),
        row(m, "(1, 1, 1)", "999"),  # third
        row("split", "(8, 8, 1)", "26,000"),
        row(m, "(2, 1, 1)", "999"),
        row("sdpa", "(16, 8, 1)", "50,000"),
    )
    times = ncu_decode.durations_by_call(rows, calls=3)
    assert times == {1: 26.0, 2: 12.0}  # medians of (24, 32, 26) and (10, 12, 50) µs; 3 never ran
    in_us = report(*rows[3:-1], unit="us")  # the same launches, durations read as µs
    assert ncu_decode.durations_by_call(in_us, calls=2)[1] == 26_000.0


def test_ncu_decode_times_each_kernel_at_its_own_rule_and_the_forced_counts():
    assert ncu_decode.split_counts(2048, 8, [2, 8, 32]) == [2, 8, 32]
    assert ncu_decode.split_counts(2048, 4, [2, 8, 256]) == [2, 4, 8]  # 2048 keys: 128 blocks
    assert ncu_decode.split_counts(32, 1, [2, 8]) == [1, 2]


@pytest.mark.parametrize(
    ("tool", "argv"),
    [("sdpa_check", ["2048"]), ("sdpa_check", ["0x16"]), ("split_sweep", ["--ab-rounds", "0"]),
     ("split_sweep", ["--splits", "0"]), ("layout_probe", ["8"]), ("layout_probe", ["1k"]),
     ("layout_probe", ["--rounds", "0"]), ("variant_ab", ["--variants", "two,pf"]),
     ("variant_ab", ["--rounds", "0"]), ("variant_ab", ["--splits", "0"]),
     ("block_clock", ["--calls", "1"]), ("block_clock", ["32kx1"]),
     ("queue_probe", ["--splits", "1"]), ("queue_probe", ["--blocks", "0"])],
)  # fmt: skip
def test_gpu_timing_tools_refuse_bad_arguments_before_any_gpu_work(tool, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        load(tool).main(argv)
    assert exit_.value.code == 2
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["sdpa_check", "split_sweep", "layout_probe", "variant_ab"])
def test_gpu_timing_tools_say_so_without_a_kernel_backend(tool, monkeypatch, capsys):
    from pagedkv.mlx_backend.kernels import decode

    monkeypatch.setattr(decode, "backend", lambda: None)
    assert load(tool).main([]) == 1
    assert "no kernel backend" in capsys.readouterr().out


def test_block_clock_needs_tensor_cores_and_tells_placement_from_chance(monkeypatch, capsys):
    """Without a CUDA GPU it says so; its tail report finds SMs that are late in every call
    (correlation near 1) and ones late by chance (near 0), and splits exits by SM sharing."""
    import numpy as np

    from pagedkv.mlx_backend.kernels import decode

    block_clock = load("block_clock")
    monkeypatch.setattr(decode, "backend", lambda: None)
    assert block_clock.main([]) == 1
    assert "tensor cores" in capsys.readouterr().out
    rng = np.random.default_rng(0)
    sm = np.concatenate([np.arange(132), np.arange(124)])  # 256 blocks: 8 SMs hold one
    stamps = [np.stack([sm * 0, sm * 0, sm * 0, sm], axis=1) for _ in range(6)]
    placed = [np.stack([sm * 0, sm * 0, 50.0 + sm % 7 + rng.random(256)], 1) for _ in range(6)]
    chance = [np.stack([sm * 0, sm * 0, 50.0 + 7 * rng.random(256)], 1) for _ in range(6)]
    placement = float(block_clock.tail_report(stamps, placed).split("calls ")[1].split(";")[0])
    luck = float(block_clock.tail_report(stamps, chance).split("calls ")[1].split(";")[0])
    assert placement > 0.9 and abs(luck) < 0.4
    assert "alone on an SM" in block_clock.tail_report(stamps, chance)
    assert "(40)" in block_clock.tail_report(
        stamps, chance
    )  # 8 SMs alone x 5 calls after the first


def test_variant_ab_sets_each_variants_switches_only_while_preparing(monkeypatch):
    """Each variant's launch is prepared with its switches (views, single launch) and the
    module's switches are the shipped ones again afterwards."""
    from pagedkv.mlx_backend.kernels import decode

    variant_ab = load("variant_ab")
    seen = []
    monkeypatch.setattr(
        variant_ab, "path_calls",
        lambda *a: seen.append((decode.ONE_LAUNCH, decode.POOL_VIEWS)) or {"kernel": ["k"]},
    )  # fmt: skip
    shipped = (decode.ONE_LAUNCH, decode.POOL_VIEWS)
    for variant in ("two", "whole", "one"):
        assert variant_ab.variant_calls(variant, [], [], None, None) == ["k"]
        assert (decode.ONE_LAUNCH, decode.POOL_VIEWS) == shipped
    assert seen == [(False, True), (False, False), (True, True)]


def test_layout_probe_times_equal_bytes_in_both_layouts(monkeypatch, capsys):
    """With the kernel faked (no GPU here): both layouts hold the same K/V bytes (batch 1 x 8 kv
    heads, batch 8 x 1), each timed on both paths, and the kernel's launch sees each layout's
    pools and query heads (4 per kv head)."""
    from pagedkv.benchmarks import gather
    from pagedkv.mlx_backend.kernels import decode

    launches = []

    class Launch:
        splits = 4

        def __call__(self, q, k, v):
            return q + 0

    def prepare(queries, k_pool, batch, scale, has_sinks=False):
        launches.append((queries.shape, k_pool.shape, k_pool.nbytes))
        return Launch()

    monkeypatch.setattr(decode, "backend", lambda: "cuda")
    monkeypatch.setattr(decode, "prepare", prepare)
    monkeypatch.setattr(gather, "per_call_us", lambda chain: (chain(), 1.0)[1])
    probe = load("layout_probe")
    monkeypatch.setattr(probe, "per_call_us", gather.per_call_us)
    assert probe.main(["64", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("ctx 64 batch 1 x 8 kv heads") == 2 and out.count("batch 8 x 1 kv heads") == 2
    shapes = {(q[:2], k[2]) for q, k, _ in launches}  # (rows, query heads), kv heads
    assert shapes == {((1, 32), 8), ((8, 4), 1)}
    assert len({nbytes for _, _, nbytes in launches}) == 1  # the same pool bytes


def test_split_sweep_calls_the_kernel_as_a_decode_step_does(monkeypatch):
    """With the kernel faked (no GPU here): each timing prepares one launch for the chained
    queries' shape, at the count it times (None: the rule's), and calls it once per copy."""
    from pagedkv.benchmarks import gather
    from pagedkv.mlx_backend.kernels import decode

    prepared = []

    class Launch:
        splits = 2

        def __call__(self, q, k, v):
            return q + 0

    def prepare(queries, k_pool, batch, scale, has_sinks=False, num_splits=None):
        prepared.append((queries.shape, num_splits))
        return Launch()

    monkeypatch.setattr(decode, "backend", lambda: "metal")  # no one-launch A/B
    monkeypatch.setattr(decode, "prepare", prepare)
    sweep = load("split_sweep")
    monkeypatch.setattr(sweep, "per_call_us", lambda chain: (chain(), chain(), 1.0)[2])
    monkeypatch.setattr(gather, "per_call_us", sweep.per_call_us)
    row = sweep.sweep_cell(64, 2, (1, 2, 8))
    assert row["rule_splits"] == 2 and {"s1_us", "s2_us"} <= set(row) and "s8_us" not in row
    timed = [p for p in prepared if len(p[0]) == 4]  # the rule's count: also the cuDNN cell's
    shape = (2, 32, 1, 128)
    assert timed == [(shape, None), (shape, None), (shape, 1), (shape, 2)]


def test_queue_probe_gives_the_shipped_split_output_bit_for_bit(monkeypatch):
    """tools/paged_decode_queue.cu (persistent threadblocks taking split items from a counter,
    each warp loading the next item's first keys early) writes the shipped split launch's
    partials, so its output is that launch's at the same split count, bit for bit: run on the
    CUDA stand-in with ragged rows, a window and GQA 8, fewer threadblocks than items."""
    import mlx.core as mx

    from pagedkv.mlx_backend.kernels import decode
    from tests import kernel_stand_in
    from tests.kernel_stand_in import checks
    from tests.parity.test_kernel_parity import RAGGED, case

    queue_probe = load("queue_probe")
    monkeypatch.setattr(decode, "backend", lambda: None)
    assert queue_probe.main([]) == 1  # no CUDA GPU: it says so (on stdout) and stops
    monkeypatch.undo()
    if kernel_stand_in.unavailable("cuda") is not None:
        pytest.skip(str(kernel_stand_in.unavailable("cuda")))
    monkeypatch.setattr(mx.fast, "cuda_kernel", kernel_stand_in.cuda_kernel)
    monkeypatch.setattr(decode, "POOL_VIEWS", False)  # the stand-in reads whole arrays
    monkeypatch.setattr(decode, "cuda_arch", lambda: 90)
    checks.clear_kernel_caches()
    queue_probe.queue_kernel.cache_clear()
    try:
        for dtype, group, window, splits, blocks in [
            ("float16", 4, None, 3, 4), ("bfloat16", 8, 48, 2, 1), ("float16", 2, None, 5, 64)
        ]:  # fmt: skip
            (queries, k_pool, v_pool, batch, _), _, _ = case(
                dtype, 64, 16, group, RAGGED, window=window
            )
            shipped = decode.prepare(queries, k_pool, batch, 0.3, False, splits, "cuda")
            assert shipped.plan.shape.tensor_cores and not shipped.pool_views
            queue = queue_probe.queue_launch(queries, k_pool, batch, 0.3, splits, blocks)
            want, got = shipped(queries, k_pool, v_pool), queue(queries, k_pool, v_pool)
            assert mx.array_equal(want, got), (dtype, group, window, splits, blocks)
    finally:
        checks.clear_kernel_caches()
        queue_probe.queue_kernel.cache_clear()
