"""Decode placeholders (pagedkv/mlx_lm/callers.py, PagedLayerCache._fetch_in): an attention function
proven to pass the fetched history straight to the routed helper gets two placeholders instead of a
lazy gather; every other caller gets the real history.

These tests prove that the placeholders really are handed out to mlx-lm's models (decode, batched
decode, mlx-lm's batch protocol), never to anyone else (test code, a closed store), that the output
stays mlx-lm's own whether the routed cache answers or declines (then it builds the real history in
their place), and that misused placeholders fail loudly. CPU or GPU; float32 within 1e-4.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import base
from mlx_lm.models.cache import make_prompt_cache

from pagedkv.errors import InvalidArgumentError
from pagedkv.mlx_lm import PagedKVStore, routing
from pagedkv.mlx_lm.batch import RequestPool
from pagedkv.mlx_lm.callers import passes_history_through
from pagedkv.mlx_lm.layer_cache import PagedLayerCache
from pagedkv.mlx_lm.step import DecodeStep
from pagedkv.models import TINY, random_model
from tests.parity.models import prompt_tokens

# What a routed mlx-lm model module holds under the helper's name: the callers below are this
# module's functions, so they see `paged_sdpa` as llama's attention does.
scaled_dot_product_attention = routing.paged_sdpa

LAYERS, HEADS, KV_HEADS = TINY["num_hidden_layers"], TINY["num_attention_heads"], 2
DIM = TINY["hidden_size"] // HEADS
SCALE = DIM**-0.5
ATOL = 1e-4


def attend_through_routed_helper(cache, queries, keys, values, mask):
    """A proven caller: llama's shape."""
    keys, values = cache.update_and_fetch(keys, values)
    return scaled_dot_product_attention(queries, keys, values, cache=cache, scale=SCALE, mask=mask)


def fetch_only(cache, keys, values):
    """A proven caller that never reads what update_and_fetch returns."""
    keys, values = cache.update_and_fetch(keys, values)


@pytest.fixture
def handed_out(monkeypatch):
    """Per decode fetch of any PagedLayerCache, in order: whether it returned the placeholders."""
    seen: list[bool] = []
    original = PagedLayerCache._fetch_in

    def spy(self, step, pools, caller, tables=None):
        keys, values = original(self, step, pools, caller, tables)
        seen.append(keys is self._unfetched[0] and values is self._unfetched[1])
        return keys, values

    monkeypatch.setattr(PagedLayerCache, "_fetch_in", spy)
    return seen


@pytest.fixture
def stores():
    """Makes stores for a test and closes them after it (their routing ends with the test)."""
    made: list[PagedKVStore] = []

    def make(model, **kwargs) -> PagedKVStore:
        made.append(PagedKVStore.for_model(model, **{"num_blocks": 64, "block_size": 4, **kwargs}))
        return made[-1]

    yield make
    for store in made:
        store.close()


def prefill(model, caches, prompt):
    return model(mx.array(prompt)[None], cache=caches)[:, -1]


def prefilled(stores, length: int, seed: int):
    """A tiny llama, a store for it (closed after the test), and a session whose prompt of
    `length` random tokens it has prefilled: (model, store, prompt, session)."""
    model = random_model(TINY)
    store = stores(model)
    prompt = prompt_tokens(length, seed=seed)
    session = store.open(prompt)
    prefill(model, session.caches, prompt)
    return model, store, prompt, session


def decode(model, caches, logits, steps):
    """Greedy decode from the last logits: (each step's logits, the tokens fed)."""
    out, tokens = [], []
    for _ in range(steps):
        token = mx.argmax(logits, axis=-1)
        tokens.append(token.item())
        logits = model(token[:, None], cache=caches)[:, -1]
        out.append(logits)
    return out, tokens


def assert_close(got, want):
    for a, b in zip(got, want, strict=True):
        assert mx.abs(a - b).max().item() <= ATOL


def rows(seed: int, heads: int = KV_HEADS):
    return mx.random.normal((1, heads, 1, DIM), key=mx.random.key(seed))


def test_the_model_gets_placeholders_and_test_code_gets_the_real_history(handed_out, stores):
    """llama's attention gets placeholders at every decode layer (and the routed cache answers
    each); update_and_fetch called from test code, on the step's first layer and a later one, gets
    the whole history [B, kv_heads, length, head_dim]: what the pool holds, what mlx-lm holds."""
    model = random_model(TINY)
    store = stores(model)
    prompt = prompt_tokens(9, seed=1)
    session = store.open(prompt)
    _, tokens = decode(model, session.caches, prefill(model, session.caches, prompt), 3)
    assert handed_out == [True] * (LAYERS * 3)
    assert store.routed_calls == LAYERS * 3
    reference = make_prompt_cache(model)
    assert decode(model, reference, prefill(model, reference, prompt), 3)[1] == tokens
    handed_out.clear()
    for layer in range(LAYERS):  # layer 0: the full path; layer 1: the step's later-layer path
        new_keys, new_values = rows(2 * layer), rows(2 * layer + 1)
        keys, values = session.caches[layer].update_and_fetch(new_keys, new_values)
        assert keys.shape == values.shape == (1, KV_HEADS, len(prompt) + 4, DIM)
        stored_keys, stored_values = store.cache.gather(session.seq, layer)  # [L, heads, dim]
        assert np.array_equal(np.array(keys[0].transpose(1, 0, 2)), np.array(stored_keys))
        assert np.array_equal(np.array(values[0].transpose(1, 0, 2)), np.array(stored_values))
        want_keys, want_values = reference[layer].update_and_fetch(new_keys, new_values)
        assert mx.abs(keys - want_keys).max().item() <= ATOL
        assert mx.abs(values - want_values).max().item() <= ATOL
    assert handed_out == [False] * LAYERS


def test_a_declined_call_gets_mlx_lms_attention_on_the_real_history(handed_out, stores):
    """A proven caller with no mask is answered in place; with a mask the cache did not make, the
    cache declines, builds the history in the placeholders' place, and the output is exactly
    mlx-lm's helper on that history."""
    _, store, prompt, session = prefilled(stores, 7, seed=2)
    assert passes_history_through(attend_through_routed_helper.__code__)
    cache, queries = session.caches[0], rows(10, heads=HEADS)
    handed_out.clear()
    out = attend_through_routed_helper(cache, queries, rows(11), rows(12), None)
    assert handed_out == [True] and store.routed_calls == 1
    keys, values = cache.keys_and_values()
    want = base.scaled_dot_product_attention(queries, keys, values, None, SCALE, None)
    assert mx.abs(out - want).max().item() <= ATOL
    mask = mx.ones((1, 1, 1, len(prompt) + 2), dtype=mx.bool_)  # fresh: the cache did not make it
    out = attend_through_routed_helper(cache, queries, rows(13), rows(14), mask)
    assert handed_out == [True, True] and store.routed_calls == 1
    keys, values = cache.keys_and_values()
    assert keys.shape == (1, KV_HEADS, len(prompt) + 2, DIM)
    want = base.scaled_dot_product_attention(queries, keys, values, None, SCALE, mask)
    assert mx.array_equal(out, want)


def attend_to_other_keys_first(cache, queries, keys, values, other_keys, other_values):
    """A proven caller that also calls the helper on other keys, with the cache, first."""
    keys, values = cache.update_and_fetch(keys, values)
    scaled_dot_product_attention(queries, other_keys, other_values, cache=cache, scale=SCALE)
    return scaled_dot_product_attention(queries, keys, values, cache=cache, scale=SCALE, mask=None)


def test_a_helper_call_on_other_keys_does_not_use_up_the_placeholders(handed_out, stores):
    """The cache declines a call whose keys it did not hand out without forgetting the ones it
    did: the later call with the placeholders is still answered (as with no other call)."""
    _, store, _, session = prefilled(stores, 7, seed=3)
    assert passes_history_through(attend_to_other_keys_first.__code__)
    cache, queries = session.caches[0], rows(30, heads=HEADS)
    other = rows(31)
    handed_out.clear()
    out = attend_to_other_keys_first(cache, queries, rows(32), rows(33), other, other)
    assert handed_out == [True] and store.routed_calls == 1
    keys, values = cache.keys_and_values()
    want = base.scaled_dot_product_attention(queries, keys, values, None, SCALE, None)
    assert mx.abs(out - want).max().item() <= ATOL


UNROUTED_CALLER = """\
def attend_in_an_unrouted_module(cache, queries, keys, values):
    keys, values = cache.update_and_fetch(keys, values)
    return scaled_dot_product_attention(queries, keys, values, cache=cache, scale=SCALE, mask=None)
"""


def test_a_proven_caller_whose_module_keeps_mlx_lms_helper_gets_the_real_history(
    handed_out, stores, tmp_path
):
    """The proof holds, but the caller's module calls mlx-lm's own helper (not routed), which
    would read placeholders: the cache hands it the real history, and the output is mlx-lm's."""
    path = tmp_path / "unrouted_attention.py"
    path.write_text(UNROUTED_CALLER)
    namespace = {"scaled_dot_product_attention": base.scaled_dot_product_attention, "SCALE": SCALE}
    exec(compile(UNROUTED_CALLER, str(path), "exec"), namespace)
    attend = namespace["attend_in_an_unrouted_module"]
    assert passes_history_through(attend.__code__)
    _, _, _, session = prefilled(stores, 5, seed=7)
    cache, queries = session.caches[0], rows(30, heads=HEADS)
    handed_out.clear()
    out = attend(cache, queries, rows(31), rows(32))
    assert handed_out == [False]
    keys, values = cache.keys_and_values()
    want = base.scaled_dot_product_attention(queries, keys, values, None, SCALE, None)
    assert mx.array_equal(out, want)


def test_a_model_whose_every_call_is_declined_decodes_as_mlx_lm(handed_out, stores, monkeypatch):
    """With the routed cache declining every call (placeholders still handed out), greedy decode
    gives mlx-lm's tokens and logits, and those of a store that never routes."""
    monkeypatch.setattr(PagedLayerCache, "_attend", lambda self, *args: None)
    model = random_model(TINY)
    routed, plain = stores(model), stores(model, route_attention=False)
    prompt, steps = prompt_tokens(11, seed=3), 6
    results = []
    for caches in (make_prompt_cache(model), plain.open(prompt).caches):
        results.append(decode(model, caches, prefill(model, caches, prompt), steps))
    assert handed_out == [False] * (LAYERS * steps)  # the unrouted store: the real history
    handed_out.clear()
    caches = routed.open(prompt).caches
    got, tokens = decode(model, caches, prefill(model, caches, prompt), steps)
    assert handed_out == [True] * (LAYERS * steps)
    assert routed.routed_calls == 0
    for want, want_tokens in results:
        assert tokens == want_tokens
        assert_close(got, want)


def test_after_close_the_sessions_get_the_real_history_and_still_match(handed_out, stores):
    """Closing the store hands the real history to its sessions' layers from the next fetch on,
    also while another store keeps the model's module routed; decode stays mlx-lm's throughout."""
    model = random_model(TINY)
    store, other = stores(model), stores(model)
    prompt = prompt_tokens(10, seed=4)
    session, reference = store.open(prompt), make_prompt_cache(model)
    logits, want_logits = prefill(model, session.caches, prompt), prefill(model, reference, prompt)
    phases = [("routed", [True]), ("closed, module still routed", [False]), ("unrouted", [False])]
    for phase, expected in phases:
        if phase != "routed":
            (store if phase.startswith("closed") else other).close()
        handed_out.clear()
        got, tokens = decode(model, session.caches, logits, 3)
        want, want_tokens = decode(model, reference, want_logits, 3)
        assert handed_out == expected * (LAYERS * 3), phase
        assert tokens == want_tokens, phase
        assert_close(got, want)
        logits, want_logits = got[-1], want[-1]


def test_batched_ragged_decode_gets_placeholders_and_matches_each_request(handed_out, stores):
    """store.batch over prompts of different lengths: every layer of every step gets the
    placeholders, and each row's logits are mlx-lm's for that request alone."""
    model = random_model(TINY)
    store = stores(model, num_blocks=96)
    prompts = [prompt_tokens(n, seed=n) for n in (5, 13, 22)]
    sessions = [store.open(p) for p in prompts]
    last = [mx.argmax(prefill(model, s.caches, p), axis=-1) for s, p in zip(sessions, prompts)]
    alone = [make_prompt_cache(model) for _ in prompts]
    for cache, prompt in zip(alone, prompts):
        prefill(model, cache, prompt)
    batch = store.batch(sessions)
    handed_out.clear()
    tokens, steps = mx.concatenate(last)[:, None], 4
    for _ in range(steps):
        logits = model(tokens, cache=batch)[:, -1]
        for row, cache in enumerate(alone):
            want = model(tokens[row : row + 1], cache=cache)[:, -1]
            assert mx.abs(logits[row] - want[0]).max().item() <= ATOL
        tokens = mx.argmax(logits, axis=-1)[:, None]
    assert handed_out == [True] * (LAYERS * steps)
    assert store.routed_calls == LAYERS * steps


def test_mlx_lms_batch_protocol_caches_get_placeholders_through_the_adapter(handed_out, stores):
    """A RequestPool's caches (batch.py) call PagedLayerCache.update_and_fetch through their own:
    the model's frame above the adapter is the one proven, and decode matches mlx-lm."""
    model = random_model(TINY)
    pool = RequestPool(stores(model))  # probes ragged batching on a scratch store
    prompt = prompt_tokens(8, seed=5)
    caches, _ = pool.open(prompt)
    handed_out.clear()
    reference = make_prompt_cache(model)
    got, tokens = decode(model, caches, prefill(model, caches, prompt), 3)
    want, want_tokens = decode(model, reference, prefill(model, reference, prompt), 3)
    assert handed_out == [True] * (LAYERS * 3)
    assert tokens == want_tokens
    assert_close(got, want)


def test_placeholders_a_cache_did_not_just_hand_out_are_refused(handed_out, stores):
    """paged_sdpa with the placeholders and a cache that never handed them out, whose handed-out
    ones were already used, or that handed out the real history: InvalidArgumentError, never an
    answer from the wrong history."""
    _, store, _, session = prefilled(stores, 6, seed=6)
    first, second = session.caches
    queries = rows(20, heads=HEADS)

    def misuse(cache, placeholders):
        with pytest.raises(InvalidArgumentError, match="placeholder"):
            routing.paged_sdpa(queries, *placeholders, cache=cache, scale=SCALE)

    misuse(first, first._unfetched)  # never fetched in decode
    fetch_only(first, rows(21), rows(22))
    assert handed_out == [True]
    misuse(second, first._unfetched)  # the first layer handed them out, not this one
    misuse(second, second._unfetched)  # nor this layer's own, which it did not hand out
    routing.paged_sdpa(queries, *first._unfetched, cache=first, scale=SCALE)
    assert store.routed_calls == 1  # the first layer's own: answered once
    misuse(first, first._unfetched)  # already used
    second.update_and_fetch(rows(23), rows(24))  # from test code: the real history
    assert handed_out == [True, False]
    misuse(second, second._unfetched)


def test_one_placeholder_with_other_arrays_is_refused(handed_out, stores):
    """The placeholder keys with values the model made itself (or the other way round) is a
    misuse too: refused, never passed on to mlx-lm's helper as if it were a history."""
    _, store, _, session = prefilled(stores, 6, seed=7)
    cache, queries = session.caches[0], rows(40, heads=HEADS)
    handed_out.clear()
    for pair in ("keys", "values"):
        fetch_only(cache, rows(41), rows(42))
        keys, values = cache._unfetched
        own = mx.zeros((1, KV_HEADS, 1, DIM))  # any array the model made itself
        args = (keys, own) if pair == "keys" else (own, values)
        with pytest.raises(InvalidArgumentError, match="placeholder"):
            routing.paged_sdpa(queries, *args, cache=cache, scale=SCALE)
    assert handed_out == [True, True] and store.routed_calls == 0


def attend_with_sinks(cache, queries, keys, values, sinks):
    keys, values = cache.update_and_fetch(keys, values)
    return scaled_dot_product_attention(
        queries, keys, values, cache=cache, scale=SCALE, sinks=sinks
    )


def test_sinks_of_another_shape_are_declined_to_mlx_lms_helper(handed_out, stores, monkeypatch):
    """Sinks are one logit per query head; anything else is the model's own business: the cache
    declines (the kernel, which reads one per head, never sees them) and mlx-lm's helper gets the
    real history (and raises or answers as it would)."""
    attended = []
    original = DecodeStep.attend
    monkeypatch.setattr(
        DecodeStep, "attend", lambda self, *args: attended.append(args[5]) or original(self, *args)
    )
    _, store, _, session = prefilled(stores, 6, seed=8)
    assert passes_history_through(attend_with_sinks.__code__)
    cache, queries = session.caches[0], rows(50, heads=HEADS)
    good = mx.random.normal((HEADS,), key=mx.random.key(51))
    out = attend_with_sinks(cache, queries, rows(52), rows(53), good)
    assert store.routed_calls == 1
    keys, values = cache.keys_and_values()
    want = base.scaled_dot_product_attention(queries, keys, values, None, SCALE, None, sinks=good)
    assert mx.abs(out - want).max().item() <= ATOL
    # Not [HEADS]: declined, and mlx-lm's helper, given the real history, refuses it itself.
    scalar_sink = mx.array(0.5)
    with pytest.raises(ValueError, match="sinks") as declined:
        attend_with_sinks(cache, queries, rows(54), rows(55), scalar_sink)
    assert store.routed_calls == 1 and handed_out[-1] is True
    assert len(attended) == 1 and attended[0] is good  # the scalar never reached the kernel
    keys, values = cache.keys_and_values()
    with pytest.raises(ValueError) as direct:
        base.scaled_dot_product_attention(queries, keys, values, None, SCALE, None, scalar_sink)
    assert str(declined.value) == str(direct.value)


def test_an_answered_decode_builds_no_history(stores, monkeypatch):
    """Routed decode reads the pools in place: no layer gathers the history it never reads (a
    gather per pool per layer is host work, and on a GPU a copy if evaluated)."""
    model = random_model(TINY)
    store = stores(model)
    prompt = prompt_tokens(9, seed=9)
    session = store.open(prompt)
    logits = prefill(model, session.caches, prompt)
    gathers = []
    original = PagedLayerCache._gather
    monkeypatch.setattr(
        PagedLayerCache,
        "_gather",
        lambda self, *args: gathers.append(self.layer) or original(self, *args),
    )
    decode(model, session.caches, logits, 3)
    assert store.routed_calls == LAYERS * 3 and gathers == []
