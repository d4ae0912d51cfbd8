"""Every adapter operation checks everything before changing anything (issue 10, item 4).

Bad keys/values, bad trims, closed sessions, sessions of another store, numpy inputs: each raises
an error from pagedkv/errors.py and leaves the store's snapshot and every session's offsets as they
were. And the pool dtype follows the model's activation dtype, quantized models included.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from pagedkv.errors import (
    InvalidArgumentError,
    InvalidTokensError,
    KVDtypeError,
    KVShapeError,
    PagedKVError,
    UnsupportedModelError,
)
from pagedkv.mlx_lm import PagedKVStore
from tests.parity.models import prompt_tokens, tiny_model
from tests.parity.zoo import build


@pytest.fixture
def setup():
    model = tiny_model("qwen3")  # 2 kv heads of 16
    store = PagedKVStore.for_model(model, num_blocks=16, block_size=4)
    first, second = store.open(prompt_tokens(6, seed=1)), store.open(prompt_tokens(5, seed=2))
    for session in (first, second):
        model(mx.array(session.remaining_prompt)[None], cache=session.caches)
    return model, store, first, second


def unchanged(store, sessions, call, error=PagedKVError):
    before = (store.cache.snapshot(), [list(s.offsets) for s in sessions])
    with pytest.raises(error):
        call()
    assert (store.cache.snapshot(), [list(s.offsets) for s in sessions]) == before


KV = mx.zeros((1, 2, 1, 16))
BAD_KV = [
    ("numpy keys", np.zeros((1, 2, 1, 16), np.float32), KV, KVShapeError),
    ("numpy values", KV, np.zeros((1, 2, 1, 16), np.float32), KVShapeError),
    ("3-d keys", mx.zeros((2, 1, 16)), KV, KVShapeError),
    ("wrong heads", mx.zeros((1, 3, 1, 16)), KV, KVShapeError),
    ("wrong head size", mx.zeros((1, 2, 1, 8)), KV, KVShapeError),
    ("wrong batch", mx.zeros((2, 2, 1, 16)), mx.zeros((2, 2, 1, 16)), KVShapeError),
    ("values of another length", mx.zeros((1, 2, 2, 16)), KV, KVShapeError),
    ("no positions", mx.zeros((1, 2, 0, 16)), mx.zeros((1, 2, 0, 16)), KVShapeError),
    ("int keys", mx.zeros((1, 2, 1, 16), mx.int32), KV, KVDtypeError),
    ("not an array", [[0.0]], KV, KVShapeError),
]


@pytest.mark.parametrize("name,keys,values,error", BAD_KV, ids=[b[0] for b in BAD_KV])
def test_update_and_fetch_rejects_bad_keys_and_values(setup, name, keys, values, error):
    _, store, first, second = setup
    for layer in (0, 1):  # the first layer reserves positions: a failure there must not
        unchanged(
            store,
            [first, second],
            lambda layer=layer: first.caches[layer].update_and_fetch(keys, values),
            error,
        )


@pytest.mark.parametrize("n", [-1, 7, 2.0, True, None, "1", np.int64(1) + 0.5])
def test_trim_takes_an_int_between_0_and_the_offset(setup, n):
    _, store, first, second = setup
    unchanged(store, [first, second], lambda: first.caches[0].trim(n), InvalidArgumentError)


def test_trim_within_range_changes_only_that_layer(setup):
    _, store, first, _ = setup
    assert first.caches[0].trim(6) == 6 and first.offsets == [0, 6]
    assert first.caches[1].trim(0) == 0


def test_closed_sessions_are_refused_everywhere(setup):
    _, store, first, second = setup
    batch = store.batch([first, second])
    first.close()
    calls = [
        lambda: first.caches[0].update_and_fetch(KV, KV),
        lambda: first.caches[0].trim(1),
        lambda: batch[0].update_and_fetch(mx.zeros((2, 2, 1, 16)), mx.zeros((2, 2, 1, 16))),
        lambda: store.batch([first, second]),
    ]
    for call in calls:
        unchanged(store, [second], call, InvalidArgumentError)


def test_batch_refuses_foreign_duplicate_and_malformed_sessions(setup):
    model, store, first, second = setup
    other = PagedKVStore.for_model(model, num_blocks=8, block_size=4)
    stranger = other.open([1, 2, 3])
    for sessions in ([first, stranger], [first, first], [], [first, "second"], [first, 3]):
        unchanged(
            store,
            [first, second],
            lambda sessions=sessions: store.batch(sessions),
            InvalidArgumentError,
        )


def test_open_rejects_bad_tokens_without_change(setup):
    _, store, first, second = setup
    bad = ([], [1.5], ["a"], [-1], np.array([[1, 2]]), mx.array([1.0, 2.0]), mx.array([[1, 2]]),
           mx.array([True, False]), mx.array([1, -2]))  # fmt: skip
    for tokens in bad:
        unchanged(
            store, [first, second], lambda tokens=tokens: store.open(tokens), InvalidTokensError
        )


def test_open_takes_a_1d_integer_mx_array_as_its_tokens(setup):
    _, store, _, _ = setup
    tokens = prompt_tokens(6, seed=1)
    for array in (mx.array(tokens), mx.array(tokens, dtype=mx.uint16)):
        session = store.open(array)
        assert list(store.cache.tokens(session.seq)) == tokens
        session.close()


def test_a_store_routes_by_default_with_blocks_of_16_and_stops_when_closed():
    model = tiny_model("qwen3")
    store = PagedKVStore.for_model(model, num_blocks=16)
    plain = PagedKVStore.for_model(model, num_blocks=16, route_attention=False)
    assert store.config.block_size == 16
    assert store.routes_attention and not plain.routes_attention
    store.close()
    assert not store.routes_attention
    plain.close()


def test_pool_dtype_is_the_activation_dtype_even_when_quantized():
    model = tiny_model("llama", dtype=mx.float16)
    assert PagedKVStore.for_model(model, num_blocks=4).config.dtype == "float16"
    nn.quantize(model, group_size=32, bits=4)  # uint32 packed weights, float16 scales
    assert PagedKVStore.for_model(model, num_blocks=4).config.dtype == "float16"
    model = tiny_model("llama", dtype=mx.bfloat16)
    nn.quantize(model, group_size=32, bits=4)
    assert PagedKVStore.for_model(model, num_blocks=4).config.dtype == "bfloat16"


def test_per_layer_shapes_come_from_the_model_not_argument_names():
    gpt2 = PagedKVStore.for_model(build("gpt2"), num_blocks=4)  # n_head, n_embd
    assert gpt2.layer_shapes == [(4, 16, 4, 16)] * 2
    openelm = PagedKVStore.for_model(build("openelm"), num_blocks=4)  # kv heads per layer
    assert openelm.layer_shapes == [(1, 16, 1, 16), (2, 16, 2, 16)]
    mla = PagedKVStore.for_model(build("deepseek_v3"), num_blocks=4)  # K and V of different sizes
    k_heads, k_dim, v_heads, v_dim = mla.layer_shapes[0]
    assert k_dim != v_dim


def test_refusals_name_the_entry_and_the_feature():
    with pytest.raises(UnsupportedModelError, match="entry 0 uses chunked attention"):
        PagedKVStore.for_model(build("llama4"), num_blocks=4)
    with pytest.raises(UnsupportedModelError, match="CacheList"):
        PagedKVStore.for_model(build("falcon_h1"), num_blocks=4)


def test_an_entry_the_model_never_updates_holds_nothing_up():
    model = build("nemotron-nas")  # layer 2's attention is a linear layer: its KVCache stays empty
    store = PagedKVStore.for_model(model, num_blocks=16, block_size=4)
    assert [e.kind for e in store.entries] == ["full", "unused"]
    assert store.config.num_layers == 1  # the pool is sized for the layer that stores K/V
    session = store.open(prompt_tokens(9, seed=3))
    model(mx.array(session.remaining_prompt)[None], cache=session.caches)
    assert session.committed  # the unused entry does not hold the commit
    assert store.open(prompt_tokens(9, seed=3)).cached_tokens == 8


def test_none_entries_stay_none_and_store_nothing():
    """A make_cache() entry of None (a layer that reads another layer's K/V) gets None."""
    from mlx_lm.models.cache import KVCache

    model = tiny_model("llama")
    model.make_cache = lambda: [KVCache(), None]  # llama runs layer 1 without a cache
    store = PagedKVStore.for_model(model, num_blocks=16, block_size=4)
    assert [e.kind for e in store.entries] == ["full", "shared"] and store.config.num_layers == 1
    session = store.open(prompt_tokens(7, seed=4))
    assert session.caches[1] is None
    dense = model(mx.array([prompt_tokens(7, seed=4)]), cache=model.make_cache())
    paged = model(mx.array([session.remaining_prompt]), cache=session.caches)
    assert mx.abs(dense - paged).max().item() <= 1e-4


def test_a_group_out_of_blocks_changes_no_group():
    """gemma3-style: full-attention and window-8 layers live in two caches. When the window
    cache cannot take a step, neither cache changes (every group is checked first)."""
    from dataclasses import replace

    from pagedkv.errors import OutOfBlocksError

    model = build("gemma3_text")
    laid_out = PagedKVStore.for_model(model, num_blocks=32, block_size=4)
    configs = [laid_out.groups[0].config, replace(laid_out.groups[1].config, num_blocks=3)]
    store = PagedKVStore(
        configs, laid_out.entries, laid_out.layer_shapes, laid_out._make_cache, model
    )

    def state():
        return [cache.snapshot() for cache in store.groups]

    before = state()
    with pytest.raises(OutOfBlocksError, match="window-8"):  # 13 positions need 4 blocks
        store.open(list(range(1, 14)))
    assert state() == before
    session = store.open(list(range(1, 12)))  # 11 positions: 3 blocks in each cache
    logits = model(mx.array([session.remaining_prompt]), cache=session.caches)
    token = mx.argmax(logits[:, -1:], axis=-1)
    logits = model(token, cache=session.caches)  # position 11: still in block 2
    before, offsets = state(), list(session.offsets)
    with pytest.raises(OutOfBlocksError):  # position 12 needs a 4th block in the window cache
        model(mx.argmax(logits[:, -1:], axis=-1), cache=session.caches)
    assert state() == before and session.offsets == offsets
