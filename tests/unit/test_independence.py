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


# The spec's split-K decode math (split_k.py) is what the backend's fused kernels compute: the
# backend holds it as a package of kernels (kernels/), the spec as one NumPy module.
SAME_JOB_OTHER_MODULE = {"split_k": "kernels"}
# The numbered rules, decisions and invariants both sides obey are stated once, in the spec
# (rules.py); `python -m pagedkv.spec` (__main__.py) regenerates docs/spec.md from them.
SPEC_ONLY_MODULES = {"rules", "__main__"}


def test_both_sides_have_the_same_module_names():
    import pkgutil

    import pagedkv.mlx_backend as backend
    import pagedkv.spec as spec

    def modules(package):
        return {m.name for m in pkgutil.iter_modules(package.__path__)}

    expected = {SAME_JOB_OTHER_MODULE.get(name, name) for name in modules(spec) - SPEC_ONLY_MODULES}
    assert expected == modules(backend)


# Spec helpers the backend does elsewhere, each for a stated reason. Everything else private on
# the spec's PagedCache has a method of the same name (and job) on the backend's.
SPEC_ONLY = {
    # The backend checks a write inline in write_kv / write_kv_batch and plans it as runs of rows
    # per block (`_runs`, `_planned_runs`), remembered for the other layers of the same step.
    "_check_write": "kv.py: write_kv, _runs",
    # NumPy gathers of every position; the backend gathers on the device (storage.gather) or
    # attends in place through the tables (attention.py, kernels/).
    "_rows_of": "kv.py: gather",
    "_read": "kv.py: gather",
    "_gather_float32": "attention.py: gather_batch",
    # A module function of attention.py there (attention is a module of functions on the device).
    "_require_window_held": "attention.py: _require_window_held",
}


@pytest.mark.skipif(not HAVE_MLX, reason="needs MLX (pagedkv[mlx])")
def test_backend_has_every_private_method_of_the_spec():
    """Same private names for the same jobs, so the two read side by side (`_sequence`,
    `_allocate`, `_release`, `_extend_plan`, ...)."""
    from pagedkv.mlx_backend import PagedCache as Backend
    from pagedkv.mlx_backend import attention
    from pagedkv.spec import PagedCache as Spec

    def private(cls):
        return {
            n
            for k in cls.__mro__
            if k.__module__.startswith("pagedkv.")
            for n, v in vars(k).items()
            if n.startswith("_") and not n.startswith("__") and callable(v)
        }

    missing = private(Spec) - private(Backend)
    assert missing == set(SPEC_ONLY), missing
    assert callable(attention._require_window_held)
