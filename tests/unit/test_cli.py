"""The command line: `pagedkv demo` runs both parts and reports agreement."""

import pytest

from pagedkv.__main__ import main
from tests.impls import HAVE_MLX


@pytest.mark.skipif(not HAVE_MLX, reason="the demo's second part needs MLX and mlx-lm")
def test_demo_runs_and_matches(capsys):
    assert main(["demo", "--requests", "3"]) == 0
    out = capsys.readouterr().out
    assert "identical block tables" in out
    assert "tokens identical to mlx-lm KVCache           yes" in out


def test_demo_rejects_bad_request_count(capsys):
    assert main(["demo", "--requests", "0"]) == 2
    assert "--requests must be >= 1" in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_MLX, reason="the bench command needs MLX")
def test_bench_writes_table_csv_and_png(tmp_path, capsys):
    assert main(["bench", "prefill", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "prefill_avoided" in out and "CSV:" in out
    csv_text = (tmp_path / "prefill.csv").read_text()
    assert csv_text.startswith("device,mlx,workload") and "chat, 8 turns" in csv_text
    assert (tmp_path / "prefill.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_rejects_bad_repeats(capsys):
    assert main(["bench", "gather", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err


def test_serve_needs_num_blocks(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "nowhere"])
    assert exit_.value.code == 2 and "--num-blocks" in capsys.readouterr().err
    assert main(["serve", "--model", "nowhere", "--num-blocks", "1"]) == 2


@pytest.mark.skipif(not HAVE_MLX, reason="the serve benchmark needs MLX and mlx-lm")
def test_serve_bench_rows():
    from pagedkv.benchmarks.serve import QUICK, serve_bench
    from tests.parity.models import tiny_model

    cfg = dict(QUICK, requests=4, system=24, suffix=4, output=4, block_size=4, budget_tokens=256)
    rows = serve_bench(tiny_model("llama"), cfg)
    assert [r[0] for r in rows] == ["mlx-lm", "pagedkv"] and rows[0][-1] is True
    assert rows[1][6] >= rows[0][6]  # at least as many requests fit the budget when paged


def test_bench_groups_are_described_once(tmp_path):
    """The command's choices, the table and CSV columns and the plot all come from one
    description per group (pagedkv/benchmarks/groups.py); every plot reads only its columns."""
    pytest.importorskip("matplotlib")
    from pagedkv.__main__ import build_parser
    from pagedkv.benchmarks.cli import cells, csv_text, plot
    from pagedkv.benchmarks.groups import GROUPS

    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    group_arg = next(a for a in bench._actions if a.dest == "group")
    assert list(group_arg.choices) == [*GROUPS, "all"]
    for name, group in GROUPS.items():
        assert len(set(group.columns)) == len(group.columns), name
        rows = [dict.fromkeys(group.columns, 1), dict.fromkeys(group.columns, 2)]
        assert cells(group, rows) == [[1] * len(group.columns), [2] * len(group.columns)]
        header = csv_text(group, rows, {"device_name": "d", "mlx": "m"}).splitlines()[0]
        assert header == ",".join(["device", "mlx", *group.columns])
        plot(group, rows, tmp_path / f"{name}.png")  # a KeyError if it reads another column
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("context, batch", [(1024, 1), (4096, 4), (16384, 16), (32768, 16)])
def test_gather_bench_cycles_enough_copies_that_l2_holds_none(context, batch):
    """Each timed call reads the next copy of a cell's K/V: between two reads of one copy at
    least COLD_BYTES pass (or 32 copies, the cap), so no call finds its K/V in the GPU's L2."""
    from pagedkv.benchmarks.gather import COLD_BYTES, copies_for, cycling, kv_bytes

    copies = copies_for(context, batch)
    assert copies == 32 or copies * kv_bytes(context, batch) >= COLD_BYTES
    fewer = copies - 1  # and no more than needed
    assert copies == 1 or fewer * kv_bytes(context, batch) < COLD_BYTES
    seen = []
    call = cycling([lambda i=i: seen.append(i) for i in range(copies)])
    for _ in range(2 * copies):
        call()
    assert seen == list(range(copies)) * 2


def test_gather_bench_chains_calls_like_a_models_layers():
    """Each timed call gets the previous call's output as its query (so MLX cannot run two calls
    at once) and reads the next copy of the arrays."""
    from pagedkv.benchmarks.gather import chained

    seen = []

    def call(copy):
        return lambda query: seen.append((copy, query)) or query + 1

    call_next = chained([call(0), call(1), call(2)], 10)
    assert [call_next() for _ in range(4)] == [11, 12, 13, 14]
    assert seen == [(0, 10), (1, 11), (2, 12), (0, 13)]


@pytest.mark.skipif(not HAVE_MLX, reason="the gather bench needs MLX (pagedkv[mlx])")
def test_gather_bench_paths_compute_the_same_attention():
    """The timed paths are the same attention: the contiguous K/V is the pools' blocks in table
    order, so SDPA on it equals gather -> SDPA on the pools, chained call after chained call."""
    import mlx.core as mx

    from pagedkv.benchmarks.gather import cell_arrays, chained, path_calls

    query, pools, dense, decode_batch = cell_arrays(40, 2, 16, mx.float32, copies=2)
    query = query[:, :, None, :]
    calls = path_calls(pools, dense, decode_batch)
    contiguous = chained(calls["contiguous"], query)
    gathered = chained(calls["gather_sdpa"], query)
    for _ in range(3):  # the second call reads the second copy, the third the first again
        expected, actual = contiguous(), gathered()
        assert actual.shape == query.shape
        assert mx.allclose(expected, actual, atol=1e-5).item()
    assert "kernel" not in calls  # no kernel backend on the CPU: that path is absent


@pytest.mark.skipif(not HAVE_MLX, reason="the gather bench needs MLX (pagedkv[mlx])")
def test_gather_bench_prepares_the_kernel_launch_once_as_a_decode_step_does(monkeypatch):
    """The kernel path pays `decode.prepare` once per cell, as a model's step does for all its
    layers, and each call is one call of that launch with its copy's pools."""
    import mlx.core as mx

    from pagedkv.benchmarks.gather import cell_arrays, chained, path_calls
    from pagedkv.mlx_backend.kernels import decode

    prepared, called = [], []

    def prepare(queries, k_pool, batch, scale, has_sinks):
        prepared.append((queries.shape, queries.dtype, batch, has_sinks))
        return lambda q, k, v: called.append((k, v)) or q + 1

    monkeypatch.setattr(decode, "backend", lambda: "cuda")
    monkeypatch.setattr(decode, "prepare", prepare)
    query, pools, dense, decode_batch = cell_arrays(40, 2, 16, mx.float16, copies=2)
    chain = chained(path_calls(pools, dense, decode_batch)["kernel"], query[:, :, None, :])
    for _ in range(3):
        chain()
    assert prepared == [((2, 32, 1, 128), mx.float16, decode_batch, False)]
    assert [id(k) for k, _ in called] == [id(pools[i % 2][0]) for i in range(3)]


def test_gather_bench_times_a_cells_paths_in_turn_and_keeps_medians(monkeypatch):
    """Drift during a cell must move every path alike: the paths alternate, round after round."""
    from pagedkv.benchmarks import gather

    order, values = [], iter([5.0, 50.0, 7.0, 70.0, 6.0, 90.0])
    chains = gather.path_chains(64, 1, 16)
    names = {id(chain): path for path, (chain, _) in chains.items()}
    monkeypatch.setattr(gather, "path_chains", lambda *args: chains)

    def fake_timing(chain, max_calls, repeats):
        assert repeats == 1
        order.append(names[id(chain)])
        return next(values)

    monkeypatch.setattr(gather, "per_call_us", fake_timing)
    cell = gather.measure_cell(64, 1, 16, read_tb_s=1.0, vector_us=float("nan"))
    assert order == list(chains) * gather.ROUNDS == ["contiguous", "gather_sdpa"] * 3
    assert (cell.contiguous_us, cell.gather_sdpa_us) == (6.0, 70.0)  # medians, not last or mean
