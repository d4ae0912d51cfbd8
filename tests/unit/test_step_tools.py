"""The decode-step tools' own logic that runs anywhere: tools/step_split.py's variants (each
changes only its side, and `apply("")` restores the shipped code), ncu_step.py and nsys_step.py's
attribution of kernels to sides, and the donation probe."""

import pytest

from tests.tool_modules import load, report, row


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


def test_step_split_views_variant_turns_pool_views_on_for_its_side_only():
    """`views`: decode.POOL_VIEWS on while its side runs (also combined with another variant);
    `apply("")` puts the shipped switch back, whatever it is."""
    from pagedkv.mlx_backend.kernels import decode

    step_split = load("step_split")
    shipped = decode.POOL_VIEWS
    try:
        for variant, on in (("views", True), ("pool=2+views", True), ("", shipped)):
            step_split.apply(variant)
            assert decode.POOL_VIEWS is on, variant
    finally:
        step_split.apply("")
    assert decode.POOL_VIEWS is shipped
