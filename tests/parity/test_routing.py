"""Attention routing: mlx-lm models on a paged store decode without a per-layer gather, and their
output is what it was on the gather path and on mlx-lm's own caches.

The routed path runs the fused kernel on a GPU with one (CUDA, Metal after its self-check) and
gather -> SDPA from the pools elsewhere (the CPU in CI); these tests run on both and demand the same
tokens and float32 logits within 1e-4. They also prove routing is established (every layer of every
decode step answered in place), scoped (a store made with route_attention=False, or a call the cache
did not make, falls back to mlx-lm's own helper) and reversible (`close`).
"""

from __future__ import annotations

import gc
import importlib

import mlx.core as mx
import pytest
from mlx_lm.models import base
from mlx_lm.models.cache import make_prompt_cache

from pagedkv.mlx_lm import PagedKVStore, routing
from pagedkv.models import TINY, random_model
from tests.parity.models import ARCHITECTURES, prompt_tokens, tiny_model

# Beyond the llama family: sliding-window layers (windows reach the kernel as a first visible
# position) and attention sinks.
EXTRA = {
    "gemma3_text": dict(
        TINY, head_dim=16, sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16
    ),
    "gpt_oss": dict(
        TINY,
        head_dim=16,
        sliding_window=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=64,
        layer_types=["sliding_attention", "full_attention"],
    ),  # fmt: skip
}
ARCHS = sorted(ARCHITECTURES) + sorted(EXTRA)
STEPS = 10


def build(arch: str):
    if arch in ARCHITECTURES:
        return tiny_model(arch)
    return random_model(EXTRA[arch], arch)


def decode_logits(model, caches, prompt, steps=STEPS):
    """Prefill, then greedy decode: the logits of every step and the tokens chosen."""
    logits = model(mx.array(prompt)[None], cache=caches)[:, -1]
    out, tokens = [logits], []
    for _ in range(steps):
        token = mx.argmax(logits, axis=-1)
        tokens.append(token.item())
        logits = model(token[:, None], cache=caches)[:, -1]
        out.append(logits)
    return out, tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_routed_decode_matches_gather_path_and_mlx_lm(arch):
    model = build(arch)
    prompt = prompt_tokens(19, seed=3)  # longer than the windows: the window matters
    routed = PagedKVStore.for_model(model, num_blocks=64, block_size=4)
    plain = PagedKVStore.for_model(model, num_blocks=64, block_size=4, route_attention=False)
    want, want_tokens = decode_logits(model, make_prompt_cache(model), prompt)
    got_plain, plain_tokens = decode_logits(model, plain.open(prompt).caches, prompt)
    got, tokens = decode_logits(model, routed.open(prompt).caches, prompt)
    assert tokens == want_tokens == plain_tokens
    for a, b, c in zip(got, want, got_plain):
        assert mx.abs(a - b).max().item() <= 1e-4
        assert mx.abs(a - c).max().item() <= 1e-4
    layers = sum(cache.config.num_layers for cache in routed.groups)  # full + window layers
    assert routed.routed_calls == layers * STEPS  # every decode layer answered in place
    assert plain.routed_calls == 0
    routed.close()


def test_batched_ragged_decode_is_routed():
    model = tiny_model("llama")
    store = PagedKVStore.for_model(model, num_blocks=96, block_size=8)
    prompts = [prompt_tokens(n, seed=n) for n in (5, 17, 30)]
    sessions = [store.open(p) for p in prompts]
    last = []
    for session in sessions:  # prefill each alone
        logits = model(mx.array(session.remaining_prompt)[None], cache=session.caches)
        last.append(mx.argmax(logits[:, -1], axis=-1))
    batch = store.batch(sessions)
    tokens = mx.concatenate(last)[:, None]
    alone = [make_prompt_cache(model) for _ in prompts]
    for cache, prompt in zip(alone, prompts):
        model(mx.array(prompt)[None], cache=cache)
    for _ in range(4):
        logits = model(tokens, cache=batch)[:, -1]
        for row, cache in enumerate(alone):
            want = model(tokens[row : row + 1], cache=cache)[:, -1]
            assert mx.abs(logits[row] - want[0]).max().item() <= 1e-4
        tokens = mx.argmax(logits, axis=-1)[:, None]
    assert store.routed_calls == 4 * sum(cache.config.num_layers for cache in store.groups)
    store.close()


def test_calls_the_cache_did_not_make_fall_back_to_mlx_lm():
    model = tiny_model("llama")
    store = PagedKVStore.for_model(model, num_blocks=32, block_size=4)
    session = store.open(prompt_tokens(9, seed=1))
    model(mx.array(session.remaining_prompt)[None], cache=session.caches)
    cache = session.caches[0]
    heads, dim = 4, 16
    queries = mx.random.normal((1, heads, 1, dim))
    new = mx.random.normal((1, 2, 1, dim))
    scale = dim**-0.5
    calls = {
        "a mask the cache did not make": lambda k, v: (k, v, scale, mx.ones((1, 1, 1, k.shape[2]), dtype=mx.bool_)),
        "transformed keys": lambda k, v: (k + 0, v, scale, None),
        "an array scale": lambda k, v: (k, v, mx.array(scale), None),
    }  # fmt: skip
    for name, make in calls.items():
        keys, values = cache.update_and_fetch(new, new)
        keys, values, call_scale, mask = make(keys, values)
        want = base.scaled_dot_product_attention(queries, keys, values, None, call_scale, mask)
        out = routing.paged_sdpa(queries, keys, values, cache, call_scale, mask)
        assert store.routed_calls == 0, name  # answered by mlx-lm's helper, not routed
        assert mx.array_equal(out, want), name
    store.close()


def test_routing_is_scoped_and_reversible(monkeypatch):
    gc.collect()  # stores other tests dropped unroute when collected (they hold cycles)
    model = tiny_model("qwen3")
    module = importlib.import_module("mlx_lm.models.qwen3")
    name = module.__name__
    original = base.scaled_dot_product_attention
    # As in a fresh process, whatever stores other tests still hold: no users, mlx-lm's helper
    # (both restored after the test, so those stores keep their routing).
    monkeypatch.setattr(routing, "_USERS", {})
    monkeypatch.setattr(module, "scaled_dot_product_attention", original)
    first = PagedKVStore.for_model(model, num_blocks=16, block_size=4)
    second = PagedKVStore.for_model(model, num_blocks=16, block_size=4)
    assert module.scaled_dot_product_attention is routing.paged_sdpa
    assert routing._USERS == {name: 2}  # other models' modules untouched
    first.close()
    first.close()  # closing twice undoes once
    assert module.scaled_dot_product_attention is routing.paged_sdpa  # second still routes
    second.close()
    assert routing._USERS == {}
    assert module.scaled_dot_product_attention is original
    third = PagedKVStore.for_model(model, num_blocks=16, block_size=4)
    del third  # dropping the store undoes its routing too
    gc.collect()
    assert routing._USERS == {}
    assert module.scaled_dot_product_attention is original
