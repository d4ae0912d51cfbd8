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


BACKEND_ONLY = {"block_table_array"}  # the live int32 table a kernel reads; the spec has no arrays


@pytest.mark.skipif(not HAVE_MLX, reason="needs MLX (pagedkv[mlx])")
def test_both_sides_offer_the_same_operations_from_the_same_module_layout():
    """Same public operations, each defined in the same-named module on both sides (metadata in
    cache.py, K/V writes, reads and attention in kv.py), so the two read side by side."""
    import inspect

    from pagedkv.mlx_backend import PagedCache as Backend
    from pagedkv.spec import PagedCache as Spec

    def operations(cls):
        return {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}

    assert operations(Spec) == operations(Backend) - BACKEND_ONLY

    def home(cls, name):  # the module whose class defines it (wrappers keep __wrapped__)
        owner = next(k for k in cls.__mro__ if name in vars(k))
        return owner.__module__.rsplit(".", 1)[-1]

    for name in operations(Spec):
        assert home(Spec, name) == home(Backend, name), name
        params = list(inspect.signature(getattr(Spec, name)).parameters)[1:]  # after self
        assert params == list(inspect.signature(getattr(Backend, name)).parameters)[1:], name
