"""The rules of the adapter's cache kinds and its ragged-batch probe (pagedkv/mlx_lm/kinds.py,
pagedkv/mlx_lm/probe.py): which `make_cache()` entry is which kind (exact type checks, not
`isinstance`, except for the recurrent `ArraysCache` family), what is refused and how the refusal
names the entry and the feature, that a model needs at least one paged entry, where the entries
come from when a model has no `make_cache()`; and that the probe answers True for a model that
takes positions from `cache.offset` at any block size, False for one that takes them from the key
length or raises, with the tolerance inclusive, on a scratch pool that leaves the store as it was.
Models are built here (tests/parity/models.py, tests/parity/zoo.py): no downloads."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import (  # noqa: E402
    ArraysCache,
    CacheList,
    ChunkedKVCache,
    ConcatenateKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
)

from pagedkv.errors import UnsupportedModelError  # noqa: E402
from pagedkv.mlx_lm import PagedKVStore, probe  # noqa: E402
from pagedkv.mlx_lm.kinds import (  # noqa: E402
    FULL,
    RECURRENT,
    SHARED,
    WINDOW,
    LayerKind,
    classify,
    classify_all,
    default_caches,
)
from tests.parity.models import tiny_model  # noqa: E402

# ---------------------------------------------------------------------------------------------
# kinds.py: one entry


def test_none_is_a_shared_layer_that_is_not_paged():
    """A `None` entry (a layer reading another layer's K/V) is `shared`: no window, not paged."""
    kind = classify(None, 0)
    assert kind == LayerKind(SHARED) and kind.window is None and not kind.paged


def test_a_plain_kvcache_is_full_attention():
    """A `KVCache` entry is `full`: paged, with no window."""
    kind = classify(KVCache(), 0)
    assert kind == LayerKind(FULL) and kind.window is None and kind.paged


def test_a_rotating_cache_without_sinks_is_a_window_of_its_max_size():
    """`RotatingKVCache(max_size)` (keep=0) is a paged `window` entry of exactly max_size tokens,
    as a Python int."""
    kind = classify(RotatingKVCache(max_size=8), 0)
    assert kind == LayerKind(WINDOW, window=8) and kind.paged
    assert type(kind.window) is int


def test_a_rotating_cache_with_sink_tokens_is_refused_naming_entry_and_sinks():
    """`RotatingKVCache(keep > 0)` (StreamingLLM sinks) is refused, naming the entry's index and
    how many sink tokens it keeps; keep=1 is already refused."""
    with pytest.raises(UnsupportedModelError, match="entry 3 is a RotatingKVCache keeping 4 sink"):
        classify(RotatingKVCache(max_size=8, keep=4), 3)
    with pytest.raises(UnsupportedModelError, match="keeping 1 sink tokens"):
        classify(RotatingKVCache(max_size=8, keep=1), 0)


def test_arrays_cache_and_its_subclasses_are_recurrent():
    """`ArraysCache` and any subclass of it (Mamba-style, linear attention) is `recurrent`: not
    paged, no window."""

    class ConvSSM(ArraysCache):
        pass

    for entry in (ArraysCache(2), ConvSSM(2)):
        kind = classify(entry, 0)
        assert kind == LayerKind(RECURRENT) and kind.window is None and not kind.paged


def test_subclasses_of_kvcache_and_rotatingkvcache_are_refused_by_name():
    """Exact type checks: a subclass of `KVCache` or `RotatingKVCache` may change what attention
    sees, so it is refused as an unknown cache class, named."""

    class MyKV(KVCache):
        pass

    class MyRotating(RotatingKVCache):
        pass

    with pytest.raises(UnsupportedModelError, match=r"does not know \(MyKV\)"):
        classify(MyKV(), 0)
    with pytest.raises(UnsupportedModelError, match=r"does not know \(MyRotating\)"):
        classify(MyRotating(max_size=8), 0)


REFUSED = [
    (lambda: ChunkedKVCache(4), "chunked attention (ChunkedKVCache): keys before the chunk"),
    (lambda: CacheList(KVCache(), KVCache()), "several caches in one layer (CacheList)"),
    (lambda: QuantizedKVCache(), "a quantized K/V cache (QuantizedKVCache)"),
    (lambda: ConcatenateKVCache(), "a ConcatenateKVCache"),
    (lambda: object(), "a cache class pagedkv does not know (object)"),
]


@pytest.mark.parametrize("make,feature", REFUSED, ids=[r[1] for r in REFUSED])
def test_what_cannot_run_exactly_is_refused_naming_entry_and_feature(make, feature):
    """Every other entry is refused with `cache entry {index} uses {feature}`."""
    with pytest.raises(UnsupportedModelError) as refused:
        classify(make(), 5)
    assert f"cache entry 5 uses {feature}" in str(refused.value)
    assert "pagedkv cannot run it exactly" in str(refused.value)


# ---------------------------------------------------------------------------------------------
# kinds.py: every entry, and where the entries come from


def test_classify_all_keeps_the_order_and_kind_of_every_entry():
    """`classify_all` gives one kind per entry, in order, once one entry is paged."""
    entries = [None, ArraysCache(2), KVCache(), RotatingKVCache(max_size=4)]
    assert classify_all(entries) == [
        LayerKind(SHARED),
        LayerKind(RECURRENT),
        LayerKind(FULL),
        LayerKind(WINDOW, window=4),
    ]
    assert classify_all([RotatingKVCache(max_size=4)]) == [LayerKind(WINDOW, window=4)]


def test_classify_all_refuses_a_model_with_no_paged_entry():
    """A model whose entries are all recurrent or shared (or that has none) has nothing to page
    and is refused."""
    for entries in ([ArraysCache(2), None], [None], []):
        with pytest.raises(UnsupportedModelError, match="keeps no attention K/V"):
            classify_all(entries)


def test_classify_all_names_the_position_of_the_refused_entry():
    """The refusal names the entry by its position in the list (the first refused one)."""
    entries = [KVCache(), None, RotatingKVCache(max_size=4, keep=2), QuantizedKVCache()]
    with pytest.raises(UnsupportedModelError, match="entry 2 is a RotatingKVCache"):
        classify_all(entries)


def test_default_caches_are_make_cache_as_a_list():
    """A model with `make_cache()` gets exactly those entries (the same objects), as a list."""
    made = (KVCache(), None)
    model = SimpleNamespace(make_cache=lambda: made, layers=[1, 2, 3])
    caches = default_caches(model)
    assert type(caches) is list and len(caches) == 2
    assert caches[0] is made[0] and caches[1] is None


def test_default_caches_without_make_cache_are_one_kvcache_per_layer():
    """Without `make_cache()`, one fresh `KVCache` per layer (mlx-lm's default)."""
    caches = default_caches(SimpleNamespace(layers=[1, 2, 3]))
    assert len(caches) == 3 and all(type(c) is KVCache for c in caches)
    assert len({id(c) for c in caches}) == 3


def test_default_caches_refuse_a_model_with_neither_make_cache_nor_layers():
    """An object with neither `make_cache()` nor `layers` is refused, naming its class."""

    class NotAModel:
        pass

    with pytest.raises(UnsupportedModelError, match="NotAModel has neither make_cache"):
        default_caches(NotAModel())


# ---------------------------------------------------------------------------------------------
# probe.py


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("block_size", [1, 2, 4, 16])
def test_a_model_using_cache_offset_is_exact_at_any_block_size(llama, block_size):
    """llama takes positions from `cache.offset`: the probe says True whatever the block size
    (its scratch pool is large enough for both passes even with 1-token blocks)."""
    store = PagedKVStore.for_model(llama, num_blocks=4, block_size=block_size)
    assert probe.ragged_batch_is_exact(store, llama) is True


def test_a_half_precision_model_is_exact_within_its_dtype_tolerance():
    """A float16 model is judged with the float16 tolerance and found exact."""
    model = tiny_model("llama", dtype=mx.float16)
    store = PagedKVStore.for_model(model, num_blocks=4, block_size=4)
    assert store.config.dtype == "float16"
    assert probe.ragged_batch_is_exact(store, model) is True


def test_a_model_taking_positions_from_the_key_length_is_not_exact():
    """afm7's K/V-reuse layers take positions from `keys.shape[2] - L`: a ragged batch rotates
    the shorter row wrongly, and the probe says False."""
    from tests.parity.zoo import build

    model = build("afm7")
    store = PagedKVStore.for_model(model, num_blocks=16, block_size=4)
    assert probe.ragged_batch_is_exact(store, model) is False


def test_a_model_that_fails_on_paged_caches_is_not_exact(llama):
    """A model that raises while probed (gpt_bigcode turns cache.offset into an int) is not
    batchable: the probe says False instead of raising."""
    store = PagedKVStore.for_model(llama, num_blocks=4, block_size=4)

    def broken(tokens, cache):
        raise TypeError("offset is not an int")

    assert probe.ragged_batch_is_exact(store, broken) is False


def test_the_tolerance_is_inclusive(llama, monkeypatch):
    """A difference equal to the dtype's tolerance is still exact; the next float above is not."""
    store = PagedKVStore.for_model(llama, num_blocks=4, block_size=4)
    limit = probe.TOLERANCE["float32"]
    monkeypatch.setattr(probe, "_compare", lambda scratch, model: limit)
    assert probe.ragged_batch_is_exact(store, llama) is True
    monkeypatch.setattr(probe, "_compare", lambda scratch, model: math.nextafter(limit, 1.0))
    assert probe.ragged_batch_is_exact(store, llama) is False


def test_the_probe_runs_on_a_scratch_store_without_prefix_sharing(llama, monkeypatch):
    """The probe decodes on a scratch store of the same layout (its own blocks, prefix sharing
    off, so both passes prefill everything), never on the store itself, which it leaves as it
    was."""
    store = PagedKVStore.for_model(llama, num_blocks=4, block_size=4)
    before = [cache.snapshot() for cache in store.groups]
    seen = []
    compare = probe._compare

    def spy(scratch, model):
        seen.append((scratch, scratch.prefix_sharing, [c.config for c in scratch.groups]))
        return compare(scratch, model)

    monkeypatch.setattr(probe, "_compare", spy)
    assert probe.ragged_batch_is_exact(store, llama) is True
    [(scratch, sharing, configs)] = seen
    assert scratch is not store and type(scratch) is type(store) and sharing is False
    assert scratch.entries == store.entries and scratch.layer_shapes == store.layer_shapes
    for config, cache in zip(configs, store.groups, strict=True):
        assert config.num_blocks >= 2 * (7 // config.block_size + 1)  # both requests at once
        assert config.block_size == cache.config.block_size
    assert [cache.snapshot() for cache in store.groups] == before
    assert store.prefix_sharing is True
