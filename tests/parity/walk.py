"""Runs one tiny architecture on pagedkv and on mlx-lm's own caches and compares.

A fresh request (prefill + decode past the window), a prefix-hit request, a trim and re-feed, and a
batch of two: every logit row within 1e-4 (float32) of mlx-lm's own caches, and so greedy tokens
identical. Or the store refuses the model with UnsupportedModelError before any forward pass.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from pagedkv.errors import UnsupportedModelError
from pagedkv.mlx_lm import PagedKVStore, PagedLayerCache

TOL = 1e-4
BLOCK = 4
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46]  # 11 tokens: past the 8-token windows
OTHER = [26, 43, 38, 32, 79]
STEPS = 6


def dense_logits(model, tokens: list[int]) -> mx.array:
    """Last-position logits of `tokens` through mlx-lm's own caches, fed as prompt + 1 by 1."""
    cache = make_prompt_cache(model)
    out = model(mx.array([tokens[:-STEPS]]), cache=cache) if len(tokens) > STEPS else None
    for t in tokens[-STEPS:] if len(tokens) > STEPS else tokens:
        out = model(mx.array([[t]]), cache=cache)
    return out[0, -1]


def dense_run(model, prompt: list[int], steps: int = STEPS):
    """Greedy decode on mlx-lm's caches: (generated tokens, logits before each of them)."""
    cache = make_prompt_cache(model)
    out = model(mx.array([prompt]), cache=cache)[0, -1]
    tokens, logits = [], []
    for _ in range(steps):
        logits.append(out)
        tokens.append(int(mx.argmax(out).item()))
        out = model(mx.array([[tokens[-1]]]), cache=cache)[0, -1]
    return tokens, logits


def close(a: mx.array, b: mx.array) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def paged_check(model, session, tokens, logits, what: str) -> None:
    """Feeds the remaining prompt then `tokens` (teacher-forced); logits and argmax must match."""
    out = model(mx.array([session.remaining_prompt]), cache=session.caches)[0, -1]
    for step, (token, expected) in enumerate(zip(tokens, logits)):
        assert close(out, expected) <= TOL, (
            f"{what}: step {step} logits off by {close(out, expected)}"
        )
        assert int(mx.argmax(out).item()) == token, f"{what}: step {step} greedy token differs"
        out = model(mx.array([[token]]), cache=session.caches)[0, -1]


def walk(model, seen: dict | None = None) -> str:
    """'refused: <message>' or 'runs' (every comparison held); raises AssertionError otherwise.
    `seen`, if given, gets the store's `routed_calls` (decode calls answered from the pools)."""
    try:
        store = PagedKVStore.for_model(model, num_blocks=64, block_size=BLOCK)
    except UnsupportedModelError as error:
        return f"refused: {error}"
    try:  # decode attention routed to the paged pools (the default), given back after
        return _walk(model, store)
    finally:
        if seen is not None:
            seen["routed_calls"] = store.routed_calls
        store.close()


def _walk(model, store) -> str:
    tokens, logits = dense_run(model, PROMPT)
    first = store.open(PROMPT)
    paged_check(model, first, tokens, logits, "fresh request")

    second_prompt = PROMPT[:8] + OTHER
    tokens2, logits2 = dense_run(model, second_prompt)
    second = store.open(second_prompt)
    assert second.cached_tokens == (8 if store.prefix_sharing else 0)
    paged_check(model, second, tokens2, logits2, "prefix-hit request")

    caches = second.caches
    if all(c is not None and c.is_trimmable() for c in caches):  # trim 3, re-feed 2 new tokens
        for cache in caches:  # an mlx-lm object of an unused entry holds 0 positions
            assert cache.trim(3) == (3 if isinstance(cache, PagedLayerCache) else 0)
        history = second_prompt + tokens2  # what the cache held: prompt + every fed token
        kept = history[:-3] + [7, 9]
        out = model(mx.array([[7, 9]]), cache=caches)[0, -1]
        assert close(out, dense_logits(model, kept)) <= TOL, "trim + re-feed"

    try:
        probe = store.batch([first, second])
    except UnsupportedModelError:
        probe = None
    if probe is not None:  # batched decode of two requests at ragged offsets
        a, b = store.open(PROMPT), store.open(OTHER + PROMPT)
        ta, la = dense_run(model, PROMPT, 3)
        tb, lb = dense_run(model, OTHER + PROMPT, 3)
        outs = [model(mx.array([s.remaining_prompt]), cache=s.caches)[0, -1] for s in (a, b)]
        batch = store.batch([a, b])
        for step in range(3):
            errors = (close(outs[0], la[step]), close(outs[1], lb[step]))
            assert max(errors) <= TOL, f"batch: step {step} logits off by {errors}"
            out = model(mx.array([[ta[step]], [tb[step]]]), cache=batch)
            outs = [out[0, -1], out[1, -1]]
        a.close()
        b.close()
    else:
        assert not store.prefix_sharing or store._batch_exact is False
    first.close()
    second.close()
    store.cache.check_invariants()
    notes = [] if store.prefix_sharing else ["hybrid: no prefix hits, no batch"]
    if store.prefix_sharing and probe is None:
        notes.append("batch refused")
    return "runs" + "".join(f" ({n})" for n in notes)
