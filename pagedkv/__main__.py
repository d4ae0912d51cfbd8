"""The `pagedkv` command line: `pagedkv demo` and `pagedkv bench GROUP` (also `python -m pagedkv`)."""

from __future__ import annotations

import argparse
import sys

from pagedkv.benchmarks.groups import GROUPS  # the descriptions only: cheap to import


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedkv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve",
        help="mlx-lm's OpenAI-compatible server on the paged store: pagedkv serve --model PATH "
        "--num-blocks N [--block-size B] [mlx_lm.server options]",
    )
    demo = commands.add_parser("demo", help="run the serving scenario and print what paging saved")
    demo.add_argument("--requests", type=int, default=8, help="concurrent requests (default 8)")
    bench = commands.add_parser("bench", help="run a benchmark group (table, CSV and PNG)")
    bench.add_argument("group", choices=[*GROUPS, "all"])
    bench.add_argument("--full", action="store_true", help="the whole sweep (default: quick)")
    bench.add_argument("--out", default="bench-results", help="folder for CSV and PNG files")
    bench.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="throughput: timed rounds per side (default 3 quick, 7 --full); admission: "
        "timed runs x10 (default 5 quick, 20 --full); medians taken",
    )
    bench.add_argument(
        "--model",
        default="auto",
        choices=["auto", "small", "llama3-8b"],
        help="throughput model: auto = Llama-3-8B shape for --full on a GPU",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # every other option is mlx-lm's server's own
        from pagedkv.mlx_lm.serve import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        if args.requests < 1:
            print("pagedkv demo: --requests must be >= 1", file=sys.stderr)
            return 2
        from pagedkv.demo import main as demo_main

        return demo_main(args)
    if args.command == "bench":
        if args.repeats is not None and args.repeats < 1:
            print("pagedkv bench: --repeats must be >= 1", file=sys.stderr)
            return 2
        from pagedkv.benchmarks.cli import main as bench_main

        return bench_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
