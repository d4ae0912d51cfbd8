"""The implementations every unit test runs against: the spec always, the MLX backend when MLX
imports (it is an extra; `make test` installs it)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from pagedkv.spec import PagedCache as SpecCache

HAVE_MLX = importlib.util.find_spec("mlx") is not None


def backend_cache():
    from pagedkv.mlx_backend import PagedCache

    return PagedCache


IMPLS = ["spec", "mlx"]


def cache_class(name: str):
    if name == "spec":
        return SpecCache
    if not HAVE_MLX:
        pytest.skip("MLX is not installed (pip install 'pagedkv[mlx]'); the spec ran instead")
    return backend_cache()


def to_numpy(array) -> np.ndarray:
    """A gathered array as NumPy (MLX arrays converted; bfloat16 widened to float32)."""
    if isinstance(array, np.ndarray):
        return array
    import mlx.core as mx

    if array.dtype == mx.bfloat16:
        array = array.astype(mx.float32)
    return np.array(array)


def kv(impl: str, rows: int, heads: int, dim: int, fill: float, dtype: str = "float32"):
    """K/V rows filled with `fill`, native to the implementation."""
    data = np.full((rows, heads, dim), fill, np.float32)
    if impl == "spec":
        return data.astype({"float32": np.float32, "float16": np.float16}[dtype])
    import mlx.core as mx

    return mx.array(data).astype(getattr(mx, dtype))
