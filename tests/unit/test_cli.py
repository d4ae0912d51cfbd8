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
