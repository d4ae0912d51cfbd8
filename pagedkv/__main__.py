"""The `pagedkv` command line: `pagedkv demo` (and `python -m pagedkv demo`)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedkv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the serving scenario and print what paging saved")
    demo.add_argument("--requests", type=int, default=8, help="concurrent requests (default 8)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        if args.requests < 1:
            print("pagedkv demo: --requests must be >= 1", file=sys.stderr)
            return 2
        from pagedkv.demo import main as demo_main

        return demo_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
