"""Automatic mutants: every small change of a few kinds in one module, one at a time.

    PYTHONPATH=. python tools/sweep_mutants.py MODULE TESTS [--lines A-B] [--json FILE] [--root DIR]

    MODULE  a Python file, relative to the root (pagedkv/mlx_lm/callers.py)
    TESTS   comma-separated pytest targets run against each mutant, fastest first

`tools/mutate.py` holds hand-written mutants, one per rule; this sweep finds the ones nobody
thought of. Kinds: a comparison flipped (< and <=, > and >=, == and !=, in and not in, is and
is not), an arithmetic operator swapped (+ and -, * and //, / to *, % to //), `and` and `or`
swapped, a `not` dropped, an integer constant plus one, a boolean constant flipped. Constants
inside f-strings (messages) are left alone. Each mutant rewrites the module through `ast.unparse`
(comments and layout go, the code stays the same), runs `python -m pytest -x -q TESTS` under the
ci Hypothesis profile and restores the file, whatever happens.

A *missed* mutant passed every test. That is a blind spot, or an equivalent mutant (the same
behaviour: a frozen dataclass unfrozen, a tie broken the other way), or one only the GPU parity
suite can judge (a kernel constant): read each one. What the first sweeps found:
docs/benchmarks.md section 10. Not part of CI (minutes per module). Exit status 1 if any mutant
is missed.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLIP_COMPARISON = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}  # fmt: skip
SWAP_ARITHMETIC = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult,
    ast.Div: ast.Mult, ast.Mod: ast.FloorDiv,
}  # fmt: skip


@dataclass(frozen=True)
class Mutant:
    node: int  # index of the node in `_nodes(tree)` order
    kind: str  # compare, arithmetic, boolop, not, int, bool
    operand: int = 0  # which comparison of a chained compare


@dataclass
class Outcome:
    line: int
    change: str
    status: str  # caught, MISSED, timeout
    seconds: float


def _nodes(tree: ast.AST) -> list[ast.AST]:
    """The tree's nodes in walk order, without those inside f-strings (messages)."""
    inside_fstrings = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.JoinedStr)
        for inner in ast.walk(node)
    }
    return [node for node in ast.walk(tree) if id(node) not in inside_fstrings]


def mutants(source: str) -> list[Mutant]:
    """Every mutant of `source`, in a fixed order."""
    found = []
    for index, node in enumerate(_nodes(ast.parse(source))):
        if isinstance(node, ast.Compare):
            found += [
                Mutant(index, "compare", i)
                for i, op in enumerate(node.ops)
                if type(op) in FLIP_COMPARISON
            ]
        elif isinstance(node, ast.BinOp) and type(node.op) in SWAP_ARITHMETIC:
            found.append(Mutant(index, "arithmetic"))
        elif isinstance(node, ast.BoolOp):
            found.append(Mutant(index, "boolop"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            found.append(Mutant(index, "not"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, bool):
            found.append(Mutant(index, "bool" if type(node.value) is bool else "int"))
    return found


def apply(source: str, mutant: Mutant) -> tuple[str, int, str]:
    """(the mutated module's source, the changed line, the change in words)."""
    tree = ast.parse(source)
    node = _nodes(tree)[mutant.node]
    line = getattr(node, "lineno", 0)
    if mutant.kind == "compare":
        old = node.ops[mutant.operand]
        node.ops[mutant.operand] = FLIP_COMPARISON[type(old)]()
        change = f"{type(old).__name__} -> {FLIP_COMPARISON[type(old)].__name__}"
    elif mutant.kind == "arithmetic":
        old = node.op
        node.op = SWAP_ARITHMETIC[type(old)]()
        change = f"{type(old).__name__} -> {type(node.op).__name__}"
    elif mutant.kind == "boolop":
        change = "and -> or" if isinstance(node.op, ast.And) else "or -> and"
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif mutant.kind == "not":
        _replace(tree, node, node.operand)
        change = "not dropped"
    elif mutant.kind == "int":
        change = f"{node.value} -> {node.value + 1}"
        node.value += 1
    else:
        change = f"{node.value} -> {not node.value}"
        node.value = not node.value
    return ast.unparse(tree) + "\n", line, change


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
            elif isinstance(value, list):
                value[:] = [new if item is old else item for item in value]


def run(root: Path, module: str, tests: list[str], mutant: Mutant, source: str) -> Outcome:
    """One mutant: write it, run the tests, restore the module."""
    path = root / module
    text, line, change = apply(source, mutant)
    start = time.perf_counter()
    env = dict(os.environ, HYPOTHESIS_PROFILE="ci", PYTHONPATH=str(root))
    try:
        path.write_text(text)
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-o", "addopts=", "-p",
             "no:cacheprovider", *tests],
            cwd=root, env=env, capture_output=True, timeout=600,
        )  # fmt: skip
        status = "caught" if result.returncode else "MISSED"
    except subprocess.TimeoutExpired:
        status = "timeout"
    finally:
        path.write_text(source)
    return Outcome(line, change, status, round(time.perf_counter() - start, 1))


def line_range(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    if not (first.isdigit() and (last or first).isdigit()) or int(first) > int(last or first):
        raise argparse.ArgumentTypeError(f"--lines takes A-B or A (line numbers), got {text!r}")
    return int(first), int(last or first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("module")
    parser.add_argument("tests")
    parser.add_argument("--lines", type=line_range, help="only mutants on lines A-B")
    parser.add_argument("--json", type=Path, help="write every outcome here as it comes")
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    path = args.root / args.module
    if path.suffix != ".py" or not path.is_file():
        parser.error(f"{args.module} is not a Python file under {args.root}")
    tests = [t for t in args.tests.split(",") if t]
    if not tests:
        parser.error("name at least one test target")
    source = path.read_text()
    nodes = _nodes(ast.parse(source))
    chosen = [
        mutant
        for mutant in mutants(source)
        if args.lines is None
        or args.lines[0] <= getattr(nodes[mutant.node], "lineno", 0) <= args.lines[1]
    ]
    print(f"{args.module}: {len(chosen)} mutants against {', '.join(tests)}", flush=True)
    # `kill` (SIGTERM) unwinds like Ctrl-C, so run's `finally` restores the module
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    outcomes = []
    for number, mutant in enumerate(chosen, 1):
        outcome = run(args.root, args.module, tests, mutant, source)
        outcomes.append(outcome)
        print(f"[{number}/{len(chosen)}] {outcome.status:7} line {outcome.line}: "
              f"{outcome.change} ({outcome.seconds} s)", flush=True)  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    missed = [o for o in outcomes if o.status != "caught"]
    print(f"{len(outcomes) - len(missed)}/{len(outcomes)} caught; not caught:", flush=True)
    for outcome in missed:
        print(f"  line {outcome.line}: {outcome.change} ({outcome.status})")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
