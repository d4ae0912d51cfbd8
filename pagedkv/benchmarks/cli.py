"""`pagedkv bench GROUP`: run a benchmark group, print a progress line per cell, an aligned table and
a CSV block, and write the CSV and a PNG plot to --out (default bench-results/)."""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

from pagedkv.benchmarks.common import device_info

GROUPS = ("gather", "memory", "prefill", "throughput", "window", "admission", "trace", "serve")


def progress(done: int, total: int, label: str, started: float) -> None:
    print(
        f"  [{done}/{total}] {label} ({time.perf_counter() - started:.1f}s)",
        file=sys.stderr,
        flush=True,
    )


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_gather(full: bool, repeats: int):
    from pagedkv.benchmarks.gather import (
        FULL,
        QUICK,
        measure_cell,
        read_bandwidth_tb_s,
        vector_sdpa_us,
    )

    sweep = FULL if full else QUICK
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
            [
                ctx,
                batch,
                block,
                cell.contiguous_us,
                cell.contiguous_vector_us,
                cell.gather_sdpa_us,
                cell.kernel_us,
                round(cell.kernel_vs_contiguous, 3),
                round(cell.kernel_vs_vector, 3),
                round(cell.gather_vs_contiguous, 3),
                round(cell.kernel_tb_s, 3),
                round(100 * cell.kernel_tb_s / read, 1),
            ]
        )
        progress(i, len(cells), f"ctx {ctx} batch {batch} block {block}", started)
    header = [
        "ctx",
        "batch",
        "block",
        "contig_us",
        "contig_vector_us",
        "gather_sdpa_us",
        "kernel_us",
        "kernel/contig",
        "kernel/vector",
        "gather/contig",
        "kernel_TB/s",
        "kernel_%read_bw",
    ]
    return header, rows


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


def run_memory(full: bool, repeats: int):
    rows = [
        [
            c.requests,
            c.prefix,
            c.paged_bytes / 2**20,
            c.dense_bytes / 2**20,
            c.saved_pct,
            c.prompt_tokens,
            c.prefill_avoided,
        ]
        for c in shared_prefix_cells(full, prefill_group=False)
    ]
    header = [
        "requests",
        "prefix",
        "paged_MiB",
        "dense_MiB",
        "saved%",
        "prompt_tokens",
        "prefill_avoided",
    ]
    return header, rows


def run_prefill(full: bool, repeats: int):
    from pagedkv.benchmarks.memory import multi_turn_chat
    from pagedkv.mlx_backend import PagedCache

    rows = [
        [
            f"shared prefix {c.prefix}",
            c.requests,
            c.prompt_tokens,
            c.prefill_avoided,
            100 * c.prefill_avoided / c.prompt_tokens,
        ]
        for c in shared_prefix_cells(full, prefill_group=True)
    ]
    chat = multi_turn_chat(PagedCache, turns=16 if full else 8)
    rows.append(
        [f"chat, {chat.turns} turns", 1, chat.prompt_tokens, chat.prefill_avoided, chat.avoided_pct]
    )
    print(f"  multi-turn chat: {chat.turns} turns", file=sys.stderr)
    return ["workload", "requests", "prompt_tokens", "prefill_avoided", "avoided%"], rows


def run_window(full: bool, repeats: int):
    from pagedkv.benchmarks.window import FULL, QUICK, window_curve
    from pagedkv.mlx_backend import PagedCache

    sweep = FULL if full else QUICK
    started = time.perf_counter()
    rows = [list(r) for r in window_curve(PagedCache, **sweep)]
    progress(1, 1, f"window {sweep['window']}, {sweep['tokens']} tokens", started)
    header = ["tokens", "window_blocks_in_use", "full_blocks_in_use", "bound"]
    return header, rows


def run_serve(full: bool, repeats: int):
    import mlx.core as mx

    from pagedkv.benchmarks.serve import FULL, QUICK, serve_bench
    from pagedkv.benchmarks.throughput import LLAMA3_8B, SMALL, build_model

    big = full and mx.default_device().type == mx.gpu
    model = build_model(LLAMA3_8B, "bfloat16") if big else build_model(SMALL, "float32")
    started = time.perf_counter()
    rows = serve_bench(model, FULL if full else QUICK)
    progress(1, 1, "trace through mlx-lm caches and the paged store", started)
    header = ["caches", "requests", "out_tok_s", "ttft_ms", "peak_kv_mib", "budget_mib",
              "fit_at_budget", "same_tokens"]  # fmt: skip
    return header, rows


def run_throughput(full: bool, repeats: int, model_name: str = "auto"):
    import mlx.core as mx

    from pagedkv.benchmarks.throughput import LLAMA3_8B, SMALL, build_model, decode_throughput

    if model_name == "auto":
        model_name = "llama3-8b" if full and mx.default_device().type == mx.gpu else "small"
    shape, dtype = (LLAMA3_8B, "bfloat16") if model_name == "llama3-8b" else (SMALL, "float32")
    model = build_model(shape, dtype)
    prefix, steps = (2048, 64) if full else (256, 16)
    cells = [(batch, False) for batch in (1, 4, 8)] + ([(8, True)] if full else [])
    started, rows = time.perf_counter(), []
    for i, (batch, ragged) in enumerate(cells, 1):
        cell = decode_throughput(model, model_name, batch, prefix, steps, ragged)
        rows.append(
            [
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
                round(cell.paged_gather_tok_s / cell.dense_tok_s, 3),
                cell.same_tokens,
            ]
        )
        progress(i, len(cells), f"{model_name} batch {batch}{' ragged' if ragged else ''}", started)
    header = [
        "model",
        "dtype",
        "batch",
        "lengths",
        "prefix",
        "steps",
        "dense_tok_s",
        "paged_tok_s",
        "paged_gather_tok_s",
        "paged/dense",
        "gather/dense",
        "same_tokens",
    ]
    return header, rows


def run_admission(full: bool, repeats: int):
    """Admission cost vs cached blocks (metadata only; see pagedkv/benchmarks/admission.py)."""
    from pagedkv.benchmarks.admission import SIZES, measure

    sizes = SIZES if full else SIZES[:3]
    cells = measure(sizes=sizes, repeats=max(10, 10 * repeats))
    print(f"  {len(sizes)} pool sizes, timed in alternation", file=sys.stderr)
    rows = [
        [c.num_blocks, c.cached_blocks, c.can_add_us, c.add_round_us, c.can_extend_us]
        for c in cells
    ]
    for name, col in (("can_add", 2), ("add_round", 3), ("can_extend", 4)):
        print(f"  {name}: largest / smallest = {rows[-1][col] / rows[0][col]:.2f}", file=sys.stderr)
    return ["num_blocks", "cached_blocks", "can_add_us", "add_round_us", "can_extend_us"], rows


def run_trace(full: bool, repeats: int):
    """The 100k-request serving trace (10k with the quick sweep), one row per window."""
    from pagedkv.benchmarks.trace import run_trace as trace

    requests = 100_000 if full else 10_000
    started, rows = time.perf_counter(), []
    for w in trace(requests=requests, window=requests // 10):
        rows.append(
            [
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
            ]
        )
        progress(len(rows), 10, f"{w.requests} requests, invariants hold", started)
    header = [
        "requests",
        "us_per_request",
        "us_per_call",
        "rss_MiB",
        "live",
        "cached_blocks",
        "evictions",
        "hit%",
        "forks",
        "rewinds",
        "aborts",
        "preempted",
    ]
    return header, rows


def plot(group: str, header: list[str], rows: list[list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    col = {name: i for i, name in enumerate(header)}
    if group == "gather":
        for batch in sorted({r[col["batch"]] for r in rows}):
            for block in sorted({r[col["block"]] for r in rows}):
                cells = [r for r in rows if r[col["batch"]] == batch and r[col["block"]] == block]
                for name, style in (("kernel/contig", "-"), ("gather/contig", ":")):
                    pts = [(r[col["ctx"]], r[col[name]]) for r in cells]
                    label = f"{name.split('/')[0]}, batch {batch}, block {block}"
                    ax.plot(*zip(*pts), marker="o", ls=style, label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="context (tokens)",
            ylabel="time / contiguous SDPA",
            title="Paged decode attention vs contiguous SDPA",
        )
    elif group == "memory":
        for prefix in sorted({r[1] for r in rows}):
            pts = [(r[0], r[2], r[3]) for r in rows if r[1] == prefix]
            line = ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                label=f"paged, prefix {prefix}",
            )
            ax.plot(
                [p[0] for p in pts],
                [p[2] for p in pts],
                ls="--",
                color=line[0].get_color(),
                label=f"dense, prefix {prefix}",
            )
        ax.set(
            xlabel="concurrent requests",
            ylabel="K/V MiB (Llama-3-8B shape, fp16)",
            title="K/V memory: paged vs mlx-lm dense caches",
            yscale="log",
        )
    elif group == "window":
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label="window layers")
        ax.plot([r[0] for r in rows], [r[2] for r in rows], marker="o", label="full attention")
        ax.plot([r[0] for r in rows], [r[3] for r in rows], ls="--", label="window/S + 1")
        ax.set(
            xlabel="tokens in the request",
            ylabel="pool blocks in use",
            title="Sliding-window layers: blocks before the window are released",
        )
    elif group == "admission":
        for name, col in (("can_add_sequence", 2), ("add + commit + free", 3), ("can_extend", 4)):
            ax.plot([r[0] for r in rows], [r[col] for r in rows], marker="o", label=name)
        ax.set(
            xscale="log",
            xlabel="blocks in the pool (all cached)",
            ylabel="µs per call (median)",
            title="Admission cost vs pool size (metadata only)",
        )
    elif group == "trace":
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label="µs per request")
        ax.set(
            xlabel="requests served",
            ylabel="µs per request (window)",
            title="Serving trace, metadata only",
            ylim=(0, 1.5 * max(r[1] for r in rows)),
        )
    elif group == "serve":
        ax.bar([r[0] for r in rows], [r[col["fit_at_budget"]] for r in rows])
        ax.set(ylabel=f"requests fitting {rows[0][col['budget_mib']]} MiB of K/V",
               title="Concurrent requests at a fixed K/V budget")  # fmt: skip
    elif group == "prefill":
        ax.barh([f"{r[0]} x{r[1]}" for r in rows], [r[4] for r in rows])
        ax.set(xlabel="prefill tokens avoided (%)", title="Prefill avoided by prefix sharing")
    else:
        labels = [f"{r[col['batch']]} {r[col['lengths']]}" for r in rows]
        for offset, (name, label) in enumerate(
            (("dense_tok_s", "mlx-lm caches"), ("paged_tok_s", "pagedkv (routed)"),
             ("paged_gather_tok_s", "pagedkv (gather)"))
        ):  # fmt: skip
            xs = [i + 0.27 * (offset - 1) for i in range(len(rows))]
            ax.bar(xs, [r[col[name]] for r in rows], width=0.27, label=label)
        ax.set_xticks(range(len(rows)), labels)
        ax.set(xlabel="batch", ylabel="decode tokens/s", title=f"Decode throughput ({rows[0][0]})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    groups = GROUPS if args.group == "all" else (args.group,)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = device_info()
    print(
        f"pagedkv bench: {', '.join(groups)} ({'full' if args.full else 'quick'}) on "
        f"{info.get('device')} ({info.get('device_name')}), MLX {info.get('mlx')}"
    )
    runners = {
        "gather": run_gather,
        "memory": run_memory,
        "prefill": run_prefill,
        "throughput": lambda full, repeats: run_throughput(full, repeats, args.model),
        "window": run_window,
        "admission": run_admission,
        "trace": run_trace,
        "serve": run_serve,
    }
    for group in groups:
        print(f"\n== {group}", flush=True)
        header, rows = runners[group](args.full, args.repeats)
        print(table(header, rows))
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["device", "mlx", *header])
        writer.writerows(
            [
                [
                    info.get("device_name"),
                    info.get("mlx"),
                    *[round(v, 2) if isinstance(v, float) else v for v in r],
                ]
                for r in rows
            ]
        )
        csv_path = out / f"{group}.csv"
        csv_path.write_text(buffer.getvalue())
        png_path = out / f"{group}.png"
        plot(group, header, rows, png_path)
        print("\nCSV:\n" + buffer.getvalue().rstrip())
        print(f"\nwrote {csv_path} and {png_path}")
    return 0
