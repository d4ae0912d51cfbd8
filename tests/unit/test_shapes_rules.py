"""The rules of K/V shape discovery (pagedkv/mlx_lm/shapes.py): what one recorded forward pass
accepts and refuses. An entry updated more than once per pass, keys and values of different
dtypes, a dtype no pool holds, and a mask window wider than the cache's window are refused with
UnsupportedModelError; a clean pass gives each paged entry its LayerShape. Small fake models
(one call per cache, shapes chosen here) check each rule directly; one tiny mlx-lm model checks
the shapes and dtype of a real pass."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import KVCache  # noqa: E402

from pagedkv.errors import UnsupportedModelError  # noqa: E402
from pagedkv.mlx_lm.kinds import FULL, RECURRENT, WINDOW, LayerKind, default_caches  # noqa: E402
from pagedkv.mlx_lm.shapes import LayerShape, _shape_of, discover_shapes  # noqa: E402
from tests.parity.models import tiny_model  # noqa: E402

KEYS = (1, 2, 1, 16)  # [B, kv_heads, L, dim] of one token
VALUES = (1, 2, 1, 8)


def _call(keys=KEYS, values=VALUES, kdt=mx.float16, vdt=mx.float16) -> tuple:
    """One recorded update_and_fetch: (keys shape, values shape, keys dtype, values dtype)."""
    return (keys, values, kdt, vdt)


class _Fake:
    """A model that hands each cache `updates` K/V pairs of its shape, masking with `window`."""

    def __init__(self, updates: int = 1, window: int | None = None, dtype=mx.float16) -> None:
        self.updates, self.window, self.dtype = updates, window, dtype

    def __call__(self, tokens, cache):
        for entry in cache:
            if isinstance(entry, KVCache):
                entry.make_mask(1, return_array=False, window_size=self.window)
                for _ in range(self.updates):
                    entry.update_and_fetch(
                        mx.zeros(KEYS, dtype=self.dtype), mx.zeros(VALUES, dtype=self.dtype)
                    )
        return mx.zeros((1, 1, 4))


# ---- _shape_of: one entry's recorded calls ------------------------------------------------------


def test_one_call_gives_heads_and_sizes_of_keys_and_values_and_the_dtype_name():
    """Rule: K and V heads and sizes come from the one call (V may differ from K: MLA), the
    dtype as its name; an entry never called has no shape."""
    assert _shape_of(0, [_call()]) == LayerShape(2, 16, 2, 8, "float16")
    assert _shape_of(0, [_call(kdt=mx.bfloat16, vdt=mx.bfloat16)]).dtype == "bfloat16"
    assert _shape_of(0, []) is None


def test_an_entry_updated_twice_in_one_pass_is_refused():
    """Rule: pagedkv keeps one K/V history per entry, so two updates of one entry in one forward
    pass (a layer reusing its cache) are refused, naming the entry and the count."""
    with pytest.raises(UnsupportedModelError, match="cache entry 3 is updated 2 times"):
        _shape_of(3, [_call(), _call()])


def test_keys_and_values_of_different_dtypes_are_refused():
    """Rule: one pool holds one dtype for K and V: keys of float16 with values of float32 are
    refused, although each dtype alone is one a pool can hold."""
    with pytest.raises(UnsupportedModelError, match="cache entry 1 receives keys of"):
        _shape_of(1, [_call(kdt=mx.float16, vdt=mx.float32)])


def test_a_dtype_no_pool_holds_is_refused_even_when_keys_and_values_agree():
    """Rule: pools hold float32, float16 or bfloat16; int8 keys and values are refused (not a
    KeyError)."""
    with pytest.raises(UnsupportedModelError, match="pools hold one of"):
        _shape_of(0, [_call(kdt=mx.int8, vdt=mx.int8)])


def test_a_layer_shape_is_a_value_that_cannot_change():
    """Rule: a LayerShape is frozen (the store lays its pools out from it once): assigning a
    field raises, and equal shapes are equal and hash alike."""
    shape = LayerShape(2, 16, 2, 8, "float16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        shape.k_heads = 4
    assert hash(shape) == hash(LayerShape(2, 16, 2, 8, "float16"))


# ---- discover_shapes: the recorded pass ---------------------------------------------------------


def test_each_paged_entry_gets_its_shape_and_others_none():
    """Rule: one pass with recording caches; paged entries (full, window) get their LayerShape,
    the others (recurrent, used as they are) None."""
    kinds = [LayerKind(FULL), LayerKind(RECURRENT), LayerKind(WINDOW, window=8)]
    shapes = discover_shapes(_Fake(window=8), [KVCache(), None, KVCache()], kinds)
    assert shapes == [LayerShape(2, 16, 2, 8, "float16"), None, LayerShape(2, 16, 2, 8, "float16")]


def test_a_mask_window_wider_than_the_caches_window_is_refused():
    """Rule: a window layer whose cache keeps 8 positions but whose mask spans 16 makes mlx-lm's
    output depend on prompt chunking; it is refused. A mask of the cache's own window is fine."""
    kinds = [LayerKind(WINDOW, window=8)]
    with pytest.raises(UnsupportedModelError, match="keeps a window of 8 .* window of 16"):
        discover_shapes(_Fake(window=16), [KVCache()], kinds)
    assert discover_shapes(_Fake(window=8), [KVCache()], kinds)[0] is not None


def test_a_pass_that_updates_an_entry_twice_is_refused():
    """Rule: the recording caches count every update of the pass (see _shape_of)."""
    with pytest.raises(UnsupportedModelError, match="updated 2 times"):
        discover_shapes(_Fake(updates=2), [KVCache()], [LayerKind(FULL)])


def test_a_real_models_shapes_and_activation_dtype():
    """Rule: a tiny qwen3 in float16 (2 K/V heads of 16) gives every layer (2, 16, 2, 16,
    "float16")."""
    model = tiny_model("qwen3", dtype=mx.float16)
    entries = default_caches(model)
    shapes = discover_shapes(model, entries, [LayerKind(FULL)] * len(entries))
    assert shapes == [LayerShape(2, 16, 2, 16, "float16")] * 2
