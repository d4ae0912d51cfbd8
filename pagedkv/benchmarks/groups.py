"""The benchmark groups, each described once: how to run it, the columns of its rows, its plot.

`pagedkv bench GROUP` (`cli.py`) is driven by these descriptions: the command's choices, the
table, the CSV header and the PNG all come from `GROUPS`. A run returns its rows as dicts keyed by
the group's column names (in that order); a plot draws those rows by column name onto a matplotlib
Axes. Importing this module is cheap: each run imports what it measures.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from pagedkv.benchmarks.common import progress

Row = dict[str, object]


@dataclass(frozen=True)
class Group:
    name: str
    columns: tuple[str, ...]
    run: Callable[[object], list[Row]]  # the parsed `pagedkv bench` arguments -> rows
    plot: Callable[[object, list[Row]], None]  # (matplotlib Axes, rows)


def row(columns: tuple[str, ...], *values) -> Row:
    assert len(values) == len(columns), (columns, values)
    return dict(zip(columns, values))


# ---- gather: paged decode attention vs contiguous SDPA ---------------------------------------------

GATHER = ("ctx", "batch", "block", "contig_us", "contig_vector_us", "gather_sdpa_us", "kernel_us",
          "kernel/contig", "kernel/vector", "gather/contig", "kernel_TB/s", "kernel_%read_bw")  # fmt: skip


def run_gather(args) -> list[Row]:
    from pagedkv.benchmarks.gather import (
        FULL,
        QUICK,
        measure_cell,
        read_bandwidth_tb_s,
        vector_sdpa_us,
    )

    sweep = FULL if args.full else QUICK
    cells = [
        (c, b, k) for c in sweep["contexts"] for b in sweep["batches"] for k in sweep["blocks"]
    ]
    started, rows = time.perf_counter(), []
    read = read_bandwidth_tb_s()
    print(f"  read bandwidth (sum over 2 GiB): {read:.2f} TB/s", file=sys.stderr)
    vector = vector_sdpa_us(cells)
    progress(0, len(cells), "contiguous SDPA without cuDNN (child process)", started)
    for i, (ctx, batch, block) in enumerate(cells, 1):
        cell = measure_cell(ctx, batch, block, read, vector[(ctx, batch, block)])
        rows.append(
            row(GATHER, ctx, batch, block, cell.contiguous_us, cell.contiguous_vector_us,
                cell.gather_sdpa_us, cell.kernel_us, round(cell.kernel_vs_contiguous, 3),
                round(cell.kernel_vs_vector, 3), round(cell.gather_vs_contiguous, 3),
                round(cell.kernel_tb_s, 3), round(100 * cell.kernel_tb_s / read, 1))
        )  # fmt: skip
        progress(i, len(cells), f"ctx {ctx} batch {batch} block {block}", started)
    return rows


def plot_gather(ax, rows: list[Row]) -> None:
    """One colour per batch; each point the median over block sizes (the CSV keeps every cell)."""
    for i, batch in enumerate(sorted({r["batch"] for r in rows})):
        contexts = sorted({r["ctx"] for r in rows if r["batch"] == batch})
        for name, style in (("kernel/contig", "-"), ("gather/contig", ":")):
            medians = [
                statistics.median(r[name] for r in rows if r["batch"] == batch and r["ctx"] == c)
                for c in contexts
            ]
            label = f"{name.split('/')[0]}, batch {batch}"
            ax.plot(contexts, medians, marker="o", ls=style, color=f"C{i}", label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.10, color="grey", lw=0.8, ls="--")  # issue 9's target from 4k context
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="time / contiguous SDPA",
           title="Paged decode attention vs contiguous SDPA (median over block sizes)")  # fmt: skip


# ---- memory and prefill: what sharing a prefix saves ------------------------------------------

MEMORY = ("requests", "prefix", "paged_MiB", "dense_MiB", "saved%", "prompt_tokens",
          "prefill_avoided")  # fmt: skip


def shared_prefix_cells(full: bool, prefill_group: bool):
    """A MemoryCell per (prefix, requests) of the sweep, with a progress line each."""
    from pagedkv.benchmarks.memory import FULL, QUICK, shared_prefix_cell
    from pagedkv.mlx_backend import PagedCache

    sweep = FULL if full else QUICK
    cells = [(n, p) for p in sweep["prefixes"] for n in sweep["requests"]]
    total, started = len(cells) + int(prefill_group), time.perf_counter()
    for i, (n, p) in enumerate(cells, 1):
        cell = shared_prefix_cell(PagedCache, n, p)
        progress(i, total, f"{n} requests, prefix {p}", started)
        yield cell


def run_memory(args) -> list[Row]:
    return [
        row(
            MEMORY,
            c.requests,
            c.prefix,
            c.paged_bytes / 2**20,
            c.dense_bytes / 2**20,
            c.saved_pct,
            c.prompt_tokens,
            c.prefill_avoided,
        )  # fmt: skip
        for c in shared_prefix_cells(args.full, prefill_group=False)
    ]


def plot_memory(ax, rows: list[Row]) -> None:
    for prefix in sorted({r["prefix"] for r in rows}):
        cells = [r for r in rows if r["prefix"] == prefix]
        requests = [r["requests"] for r in cells]
        line = ax.plot(requests, [r["paged_MiB"] for r in cells], marker="o",
                       label=f"paged, prefix {prefix}")  # fmt: skip
        ax.plot(requests, [r["dense_MiB"] for r in cells], ls="--", color=line[0].get_color(),
                label=f"dense, prefix {prefix}")  # fmt: skip
    ax.set(xlabel="concurrent requests", ylabel="K/V MiB (Llama-3-8B shape, fp16)",
           title="K/V memory: paged vs mlx-lm dense caches", yscale="log")  # fmt: skip


PREFILL = ("workload", "requests", "prompt_tokens", "prefill_avoided", "avoided%")


def run_prefill(args) -> list[Row]:
    from pagedkv.benchmarks.memory import multi_turn_chat
    from pagedkv.mlx_backend import PagedCache

    rows = [
        row(
            PREFILL,
            f"shared prefix {c.prefix}",
            c.requests,
            c.prompt_tokens,
            c.prefill_avoided,
            100 * c.prefill_avoided / c.prompt_tokens,
        )  # fmt: skip
        for c in shared_prefix_cells(args.full, prefill_group=True)
    ]
    chat = multi_turn_chat(PagedCache, turns=16 if args.full else 8)
    rows.append(
        row(
            PREFILL,
            f"chat, {chat.turns} turns",
            1,
            chat.prompt_tokens,
            chat.prefill_avoided,
            chat.avoided_pct,
        )  # fmt: skip
    )
    print(f"  multi-turn chat: {chat.turns} turns", file=sys.stderr)
    return rows


def plot_prefill(ax, rows: list[Row]) -> None:
    ax.barh([f"{r['workload']} x{r['requests']}" for r in rows], [r["avoided%"] for r in rows])
    ax.set(xlabel="prefill tokens avoided (%)", title="Prefill avoided by prefix sharing")


# ---- throughput: decode tokens/s through mlx-lm's model code ----------------------------------

THROUGHPUT = ("model", "dtype", "batch", "lengths", "prefix", "steps", "dense_tok_s",
              "paged_tok_s", "paged_gather_tok_s", "paged/dense", "gather/dense", "same_tokens")  # fmt: skip


def run_throughput(args) -> list[Row]:
    import mlx.core as mx

    from pagedkv.benchmarks.throughput import decode_throughput
    from pagedkv.models import LLAMA3_8B, SMALL, random_model

    model_name = getattr(args, "model", "auto")
    if model_name == "auto":
        model_name = "llama3-8b" if args.full and mx.default_device().type == mx.gpu else "small"
    shape, dtype = (LLAMA3_8B, "bfloat16") if model_name == "llama3-8b" else (SMALL, "float32")
    model = random_model(shape, dtype=dtype)
    prefix, steps = (2048, 64) if args.full else (256, 16)
    cells = [(batch, False) for batch in (1, 4, 8)] + ([(8, True)] if args.full else [])
    rounds = args.repeats or (7 if args.full else 3)
    started, rows = time.perf_counter(), []
    for i, (batch, ragged) in enumerate(cells, 1):
        cell = decode_throughput(model, model_name, batch, prefix, steps, ragged, repeats=rounds)
        rows.append(
            row(
                THROUGHPUT,
                model_name,
                dtype,
                batch,
                "ragged" if ragged else "equal",
                prefix,
                steps,
                cell.dense_tok_s,
                cell.paged_tok_s,
                cell.paged_gather_tok_s,
                round(cell.ratio, 3),
                round(cell.gather_ratio, 3),
                cell.same_tokens,
            )  # fmt: skip
        )
        progress(i, len(cells), f"{model_name} batch {batch}{' ragged' if ragged else ''}", started)
    return rows


def plot_throughput(ax, rows: list[Row]) -> None:
    sides = (("dense_tok_s", "mlx-lm caches"), ("paged_tok_s", "pagedkv (routed)"),
             ("paged_gather_tok_s", "pagedkv (gather)"))  # fmt: skip
    for offset, (name, label) in enumerate(sides):
        xs = [i + 0.27 * (offset - 1) for i in range(len(rows))]
        ax.bar(xs, [r[name] for r in rows], width=0.27, label=label)
    ax.set_xticks(range(len(rows)), [f"{r['batch']} {r['lengths']}" for r in rows])
    ax.set(
        xlabel="batch", ylabel="decode tokens/s", title=f"Decode throughput ({rows[0]['model']})"
    )


# ---- window: memory of sliding-window layers ---------------------------------------------------

WINDOW = ("tokens", "window_blocks_in_use", "full_blocks_in_use", "bound")


def run_window(args) -> list[Row]:
    from pagedkv.benchmarks.window import FULL, QUICK, window_curve
    from pagedkv.mlx_backend import PagedCache

    sweep = FULL if args.full else QUICK
    started = time.perf_counter()
    rows = [row(WINDOW, *r) for r in window_curve(PagedCache, **sweep)]
    progress(1, 1, f"window {sweep['window']}, {sweep['tokens']} tokens", started)
    return rows


def plot_window(ax, rows: list[Row]) -> None:
    tokens = [r["tokens"] for r in rows]
    ax.plot(tokens, [r["window_blocks_in_use"] for r in rows], marker="o", label="window layers")
    ax.plot(tokens, [r["full_blocks_in_use"] for r in rows], marker="o", label="full attention")
    ax.plot(tokens, [r["bound"] for r in rows], ls="--", label="window/S + 1")
    ax.set(xlabel="tokens in the request", ylabel="pool blocks in use",
           title="Sliding-window layers: blocks before the window are released")  # fmt: skip


# ---- admission: cost of admission checks vs cached blocks -------------------------------------

ADMISSION = ("num_blocks", "cached_blocks", "can_add_us", "add_round_us", "can_extend_us")
ADMISSION_CALLS = (("can_add_us", "can_add_sequence"), ("add_round_us", "add + commit + free"),
                   ("can_extend_us", "can_extend"))  # fmt: skip


def run_admission(args) -> list[Row]:
    """Admission cost vs cached blocks (metadata only; see pagedkv/benchmarks/admission.py)."""
    from pagedkv.benchmarks.admission import SIZES, measure

    sizes = SIZES if args.full else SIZES[:3]
    repeats = args.repeats or (20 if args.full else 5)
    cells = measure(sizes=sizes, repeats=max(10, 10 * repeats))
    print(f"  {len(sizes)} pool sizes, timed in alternation", file=sys.stderr)
    rows = [
        row(
            ADMISSION, c.num_blocks, c.cached_blocks, c.can_add_us, c.add_round_us, c.can_extend_us
        )  # fmt: skip
        for c in cells
    ]
    for column, _ in ADMISSION_CALLS:
        ratio = rows[-1][column] / rows[0][column]  # type: ignore[operator]
        print(f"  {column[:-3]}: largest / smallest = {ratio:.2f}", file=sys.stderr)
    return rows


def plot_admission(ax, rows: list[Row]) -> None:
    for column, label in ADMISSION_CALLS:
        ax.plot([r["num_blocks"] for r in rows], [r[column] for r in rows], marker="o", label=label)
    ax.set(xscale="log", xlabel="blocks in the pool (all cached)", ylabel="µs per call (median)",
           title="Admission cost vs pool size (metadata only)")  # fmt: skip


# ---- trace: a long serving trace, metadata only ------------------------------------------------

TRACE = ("requests", "us_per_request", "us_per_call", "rss_MiB", "live", "cached_blocks",
         "evictions", "hit%", "forks", "rewinds", "aborts", "preempted")  # fmt: skip


def run_trace(args) -> list[Row]:
    """The 100k-request serving trace (10k with the quick sweep), one row per window."""
    from pagedkv.benchmarks.trace import run_trace as trace

    requests = 100_000 if args.full else 10_000
    started, rows = time.perf_counter(), []
    for w in trace(requests=requests, window=requests // 10):
        rows.append(
            row(
                TRACE,
                w.requests,
                w.us_per_request,
                w.us_per_op,
                w.rss_mib,
                w.live,
                w.cached_blocks,
                w.evictions,
                w.hit_pct,
                w.forks,
                w.rewinds,
                w.aborts,
                w.preempted,
            )  # fmt: skip
        )
        progress(len(rows), 10, f"{w.requests} requests, invariants hold", started)
    return rows


def plot_trace(ax, rows: list[Row]) -> None:
    per_request = [r["us_per_request"] for r in rows]
    ax.plot([r["requests"] for r in rows], per_request, marker="o", label="µs per request")
    ax.set(xlabel="requests served", ylabel="µs per request (window)",
           title="Serving trace, metadata only", ylim=(0, 1.5 * max(per_request)))  # fmt: skip


# ---- serve: mlx-lm's batch generator on its caches and on the paged store ------------------------

SERVE = ("caches", "requests", "out_tok_s", "ttft_ms", "peak_kv_mib", "budget_mib",
         "fit_at_budget", "same_tokens")  # fmt: skip


def run_serve(args) -> list[Row]:
    import mlx.core as mx

    from pagedkv.benchmarks.serve import FULL, QUICK, serve_bench
    from pagedkv.models import LLAMA3_8B, SMALL, random_model

    big = args.full and mx.default_device().type == mx.gpu
    model = random_model(LLAMA3_8B, dtype="bfloat16") if big else random_model(SMALL)
    started = time.perf_counter()
    rows = [row(SERVE, *r) for r in serve_bench(model, FULL if args.full else QUICK)]
    progress(1, 1, "trace through mlx-lm caches and the paged store", started)
    return rows


def plot_serve(ax, rows: list[Row]) -> None:
    ax.bar([r["caches"] for r in rows], [r["fit_at_budget"] for r in rows])
    ax.set(ylabel=f"requests fitting {rows[0]['budget_mib']} MiB of K/V",
           title="Concurrent requests at a fixed K/V budget")  # fmt: skip


GROUPS = {
    group.name: group
    for group in (
        Group("gather", GATHER, run_gather, plot_gather),
        Group("memory", MEMORY, run_memory, plot_memory),
        Group("prefill", PREFILL, run_prefill, plot_prefill),
        Group("throughput", THROUGHPUT, run_throughput, plot_throughput),
        Group("window", WINDOW, run_window, plot_window),
        Group("admission", ADMISSION, run_admission, plot_admission),
        Group("trace", TRACE, run_trace, plot_trace),
        Group("serve", SERVE, run_serve, plot_serve),
    )
}
