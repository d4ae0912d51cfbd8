"""tools/sweep_mutants.py: one change of each kind, each run against the tests, the module
restored whatever happens."""

import json
import sys

import pytest

from tests.tool_modules import TOOLS, load

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
