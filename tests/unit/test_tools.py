"""The tools' own logic that runs anywhere: argument parsing, ncu report attribution, and the
automatic mutant sweep."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


def row(kernel: str, grid: str, duration: str) -> list[str]:
    return ["1", kernel, grid, duration]


def report(*rows: list[str], unit: str = "ns") -> list[list[str]]:
    return [
        ["==PROF== Connected"],
        ["ID", "Kernel Name", "Grid Size", "gpu__time_duration.sum"],
        ["", "", "", unit],
        *rows,
        ["==PROF== Disconnected"],
    ]


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


def test_step_split_simt_variant_moves_16_bit_pools_off_the_tensor_cores_and_back(monkeypatch):
    """`tools/step_split.py ... simt`: while a side runs it, 16-bit plans use paged_decode.cu as on
    a GPU before sm_80; switching back restores the tensor-core pass 1 (kernel building faked)."""
    mx = pytest.importorskip("mlx.core")
    from pagedkv.mlx_backend.kernels import decode

    step_split = load("step_split")
    monkeypatch.setattr(step_split, "_REAL", {**step_split._REAL, "arch": lambda: 90})
    monkeypatch.setattr(decode, "cuda_arch", lambda: 90)
    monkeypatch.setattr(decode, "_kernel", lambda *args, **kwargs: None)
    monkeypatch.setattr(decode, "_PLANS", {})
    queries, pool = mx.zeros((1, 8, 128), mx.bfloat16), mx.zeros((2, 16, 2, 128), mx.bfloat16)

    def tensor_cores():
        return decode.plan_for(queries, pool, False, "cuda").shape.tensor_cores

    try:
        assert tensor_cores()
        step_split.apply("simt")
        assert not tensor_cores()
        step_split.apply("")
        assert tensor_cores()
    finally:
        step_split.apply("")
        decode.Plan.of.cache_clear()


def test_ncu_decode_times_each_kernel_at_its_own_rule_and_the_forced_counts():
    assert ncu_decode.split_counts(2048, 8, [2, 8, 32]) == [2, 8, 32]
    assert ncu_decode.split_counts(2048, 4, [2, 8, 256]) == [2, 4, 8]  # 2048 keys: 128 blocks
    assert ncu_decode.split_counts(32, 1, [2, 8]) == [1, 2]


def decode_two_steps(variant: str, on_step=None):
    """Prefill 20 tokens, then two decode steps of the small model on a paged store with
    `tools/step_split.py`'s `variant` applied (the shipped code restored afterwards).
    `on_step(step)`: called with each decode step the variant records."""
    import mlx.core as mx

    from pagedkv.mlx_lm import PagedKVStore
    from pagedkv.mlx_lm.layer_cache import PagedLayerCache
    from pagedkv.models import SMALL, random_model

    step_split = load("step_split")
    model = random_model(SMALL, dtype="float32")  # seeded: the same weights every call
    store = PagedKVStore.for_model(model, num_blocks=32)
    session = store.open(list(range(20)))
    try:
        step_split.apply(variant)
        mx.eval(model(mx.array(session.remaining_prompt)[None], cache=session.caches))
        if on_step is not None:
            recorded = PagedLayerCache._record_step

            def record(self, starts):
                step = recorded(self, starts)
                on_step(step)
                return step

            PagedLayerCache._record_step = record  # apply("") below puts the real one back
        outs = [model(mx.array([[token]]), cache=session.caches) for token in (3, 4)]
        mx.eval(outs)
        return outs
    finally:
        step_split.apply("")
        store.close()


def test_step_split_every_variant_writes_like_the_real_step():
    """`tools/step_split.py ... every=N` wraps the decode write; a step through it must still run
    (the wrapper passes on every argument the real write takes) and leave the same output."""
    mx = pytest.importorskip("mlx.core")
    for every, real in zip(decode_two_steps("every=2"), decode_two_steps("")):
        assert mx.allclose(every, real).item()


ncu_step = load("ncu_step")


def test_ncu_step_charges_each_kernel_to_the_side_whose_marker_came_before_it():
    m = ncu_step.MARKER
    rows = report(
        row("warm-up kernel", "(4, 1, 1)", "5,000"),  # before any marker: not charged
        row(m, "(1, 1, 1)", "999"),
        row("gemv", "(64, 1, 1)", "20,000"),
        row("sdpa", "(16, 8, 1)", "10,000"),
        row("gemv", "(64, 1, 1)", "22,000"),
        row(m, "(2, 1, 1)", "999"),
        row("gemv", "(64, 1, 1)", "21,000"),
        row("split", "(8, 8, 1)", "12,000"),
        row("merge", "(32, 1, 1)", "3,000"),
    )
    times = ncu_step.kernel_times(rows)
    assert times == {
        1: {"gemv": [20.0, 22.0], "sdpa": [10.0]},
        2: {"gemv": [21.0], "split": [12.0], "merge": [3.0]},
    }
    lines = ncu_step.summary(times, steps=2, top=2)
    assert lines[0].startswith("== mlx-lm: 26 µs of GPU time per step, 2 kernels per step")
    assert "gemv" in lines[1] and "21.0 µs/step" in lines[1] and "sdpa" in lines[2]
    assert lines[3].startswith("== paged: 18 µs") and len(lines) == 6  # top 2 kernels per side


@pytest.mark.parametrize("argv", [["0"], ["65"], ["--steps", "0"], ["--steps", "17"], ["x"]])
def test_ncu_step_refuses_bad_arguments_before_any_gpu_work(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ncu_step.main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


SWEPT = """def visible(first, length, window):
    if window is not None and not length <= window:
        first = max(first, length - window)
    return f"{first + 1} of {length}", first < length
"""


def test_sweep_mutants_makes_one_change_of_each_kind_and_leaves_messages_alone():
    sweep = load("sweep_mutants")
    found = sweep.mutants(SWEPT)
    kinds = sorted(m.kind for m in found)
    # `is not`, `<=`, `<`: compare; `-`: arithmetic; `and`; `not`; no constants (the 1 is in
    # an f-string, a message)
    assert kinds == ["arithmetic", "boolop", "compare", "compare", "compare", "not"]
    changes = set()
    for mutant in found:
        text, line, change = sweep.apply(SWEPT, mutant)
        assert text != SWEPT and 1 <= line <= 4
        compile(text, "mutant", "exec")  # still a module
        changes.add(change)
    assert changes == {"IsNot -> Is", "LtE -> Lt", "Lt -> LtE", "Sub -> Add", "and -> or",
                       "not dropped"}  # fmt: skip
    constant = sweep.mutants("LIMIT = 8\nON = True\n")
    assert [sweep.apply("LIMIT = 8\nON = True\n", m)[2] for m in constant] == [
        "8 -> 9",
        "True -> False",
    ]


def test_sweep_mutants_runs_the_tests_against_each_mutant_and_restores_the_module(tmp_path, capsys):
    sweep = load("sweep_mutants")
    (tmp_path / "pkg.py").write_text("def grow(x):\n    return x + 1\n")
    (tmp_path / "test_pkg.py").write_text(
        "from pkg import grow\n\n\ndef test_grow():\n    assert grow(1) > 1\n"
    )
    status = sweep.main(["pkg.py", "test_pkg.py", "--root", str(tmp_path), "--json",
                         str(tmp_path / "out.json")])  # fmt: skip
    assert (tmp_path / "pkg.py").read_text() == "def grow(x):\n    return x + 1\n"
    out = capsys.readouterr().out
    assert "[1/2] caught  line 2: Add -> Sub" in out  # 1 - 1 = 0: the test fails
    assert "[2/2] MISSED  line 2: 1 -> 2" in out  # 1 + 2 > 1: a blind spot of this test
    assert status == 1
    assert [o["status"] for o in json.loads((tmp_path / "out.json").read_text())] == [
        "caught",
        "MISSED",
    ]


def test_sweep_mutants_killed_mid_mutant_restores_the_module(tmp_path):
    """SIGTERM while a mutant's tests run: the module is back as it was (not left mutated)."""
    import signal
    import subprocess
    import time

    original = "def grow(x):\n    return x + 1\n"
    (tmp_path / "pkg.py").write_text(original)
    (tmp_path / "test_pkg.py").write_text("import time\n\n\ndef test_slow():\n    time.sleep(60)\n")
    sweep = subprocess.Popen(
        [sys.executable, str(TOOLS / "sweep_mutants.py"), "pkg.py", "test_pkg.py", "--root",
         str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while (tmp_path / "pkg.py").read_text() == original and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "pkg.py").read_text() != original, "no mutant was written"
        sweep.send_signal(signal.SIGTERM)
        assert sweep.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        sweep.kill()
    assert (tmp_path / "pkg.py").read_text() == original


@pytest.mark.parametrize(
    "argv", [["nope.py", "tests"], ["tools/sweep_mutants.py", ""], ["README.md", "tests"],
             ["tools/sweep_mutants.py", "tests", "--lines", "9-3"]],
)  # fmt: skip
def test_sweep_mutants_refuses_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load("sweep_mutants").main(argv)
    assert exit_info.value.code == 2


nsys_step = load("nsys_step")


def test_nsys_step_reads_kernels_by_side_and_measures_busy_and_idle_time(tmp_path):
    """A cuda_gpu_trace CSV: memcpys skipped, kernels charged to the side whose marker came
    before them; busy time is the union of kernel intervals (overlaps counted once)."""
    m = nsys_step.MARKER
    trace = tmp_path / "trace.csv"
    trace.write_text(
        "Start (ns),Duration (ns),GrdX,Name\n"
        "0,1000,1,warm-up\n"  # before any marker: not charged
        f"5000,1000,1,{m}\n"
        "10000,4000,64,gemv\n"
        "12000,4000,8,sdpa\n"  # overlaps gemv by 2 µs
        "30000,2000,64,gemv\n"  # 14 µs idle before it: one gap over 10 µs
        "33000,500,,[CUDA memcpy Host-to-Device]\n"
        f"40000,1000,2,{m}\n"
        "41000,3000,8,split\n"
        "44000,1000,32,merge\n"
    )
    sides = nsys_step.by_side(nsys_step.trace_rows(str(trace)))
    assert [name for name, _, _ in sides[1]] == ["gemv", "sdpa", "gemv"]
    assert [name for name, _, _ in sides[2]] == ["split", "merge"]
    one = nsys_step.timeline(sides[1], steps=2)
    assert one == {
        "wall": 11.0,
        "busy": 4.0,
        "idle": 7.0,
        "gaps": 0.5,
        "gap_us": 7.0,
        "kernels": 1.5,
    }
    two = nsys_step.timeline(sides[2], steps=1)
    assert (two["wall"], two["busy"], two["idle"], two["gaps"]) == (4.0, 4.0, 0.0, 0.0)
    lines = nsys_step.summary(sides, ["dense", "paged (shipped)"], steps=1)
    assert lines[0].startswith("== dense: 22 µs/step on the GPU, busy 8, idle 14 (1.0 gaps")
    assert "gemv" in lines[1] and "6.0 µs/step" in lines[1]
    assert lines[3].startswith("== paged (shipped): 4 µs/step") and len(lines) == 6


@pytest.mark.parametrize("argv", [["0"], ["65"], ["--steps", "0"], ["--steps", "65"]])
def test_nsys_step_refuses_bad_arguments_before_any_gpu_work(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        nsys_step.main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["bogus", "pool=0", "lazyall+nope"])
def test_step_split_refuses_unknown_or_bad_variants(variant):
    step_split = load("step_split")
    with pytest.raises(SystemExit, match="step_split: "):
        step_split.apply(variant)
    step_split.apply("")


def test_step_split_functional_variant_turns_in_place_writes_off_and_back_on(monkeypatch):
    """`functional` records every step with in-place writes off (the code before them), here
    where the device is made to look as if it had the kernel (an MLX update stands in for it);
    the output is the same, and `apply("")` gives the steps their in-place writes back."""
    mx = pytest.importorskip("mlx.core")
    from pagedkv.mlx_backend.kernels import write
    from pagedkv.mlx_lm import step as step_module
    from pagedkv.mlx_lm.layer_cache import PagedLayerCache

    def write_rows(k_pool, v_pool, keys, values, slots, tables, after):
        size = k_pool.shape[1]
        k_pool[slots // size, slots % size] = keys
        v_pool[slots // size, slots % size] = values
        return tables + 0

    monkeypatch.setattr(step_module, "in_place_device", lambda: True)
    monkeypatch.setattr(write, "write_rows", write_rows)
    record = PagedLayerCache._record_step
    outs, steps = {}, {}
    for variant in ("functional", ""):
        steps[variant] = []
        outs[variant] = decode_two_steps(variant, steps[variant].append)
    assert len(steps["functional"]) == len(steps[""]) == 2  # one record per decode step
    assert not any(step.in_place for step in steps["functional"])
    assert all(step.in_place for step in steps[""])
    assert PagedLayerCache._record_step is record
    for functional, real in zip(outs["functional"], outs[""]):
        assert mx.allclose(functional, real).item()


def test_step_split_lazyall_variant_leaves_the_output_and_restores_scheduling():
    """`lazyall` schedules no write inside the step; the step's output is the same, and the
    shipped code's scheduling is back after `apply("")`."""
    mx = pytest.importorskip("mlx.core")
    import pagedkv.mlx_backend.storage as storage
    import pagedkv.mlx_lm.layer_cache as layer_cache
    import pagedkv.mlx_lm.layer_decode as layer_decode
    import pagedkv.mlx_lm.store as store_module

    for lazy, real in zip(decode_two_steps("lazyall"), decode_two_steps("")):
        assert mx.allclose(lazy, real).item()
    modules = (storage, layer_cache, layer_decode, store_module)
    assert all(module.mx is mx for module in modules)


def test_donation_probe_times_every_mode_and_refuses_an_empty_array(capsys):
    pytest.importorskip("mlx.core")
    donation = load("donation")
    for mode in ("eval", "async", "async+reader"):
        assert donation.per_update_ms(1, mode, updates=2) > 0
    donation.main(["1"])
    out = capsys.readouterr().out
    assert "1 MB array" in out and out.count("ms per update") == 3
    with pytest.raises(SystemExit, match="at least 1"):
        donation.main(["0"])


def test_step_split_pool_variant_sizes_the_store_k_times():
    """`pool=K`: K times the positions the longest request needs (prompt included), so the
    store holds K times the blocks; any other variant: what the run needs."""
    step_split = load("step_split")
    prompts = [[0] * 100, [0] * 60]
    assert step_split.tokens_ahead("", prompts, 50) == 50
    assert step_split.tokens_ahead("lazyall", prompts, 50) == 50
    assert step_split.tokens_ahead("pool=1", prompts, 50) == 50
    assert step_split.tokens_ahead("pool=4+lazyall", prompts, 50) == 4 * 150 - 100


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
