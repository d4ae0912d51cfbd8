"""The spec never imports MLX; the backend never imports (or calls) the spec."""

import subprocess
import sys

import pytest

from tests.impls import HAVE_MLX


def run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spec_imports_without_mlx():
    # Make any MLX import fail, as on a machine without MLX.
    run(
        "import sys; sys.modules['mlx'] = None; sys.modules['mlx.core'] = None\n"
        "import pagedkv, pagedkv.spec\n"
        "assert not any(m.startswith('mlx') and sys.modules[m] for m in sys.modules)"
    )


@pytest.mark.skipif(not HAVE_MLX, reason="needs MLX (pagedkv[mlx])")
def test_backend_does_not_load_the_spec():
    run(
        "import sys; import pagedkv.mlx_backend, pagedkv.mlx_backend.attention\n"
        "assert not [m for m in sys.modules if m.startswith('pagedkv.spec')], sys.modules"
    )
