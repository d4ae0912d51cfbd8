"""Capacity admission (docs/adr/0003-admission.md): on a pool far smaller than the requests'
combined budgets, requests wait instead of failing, every admitted one finishes with the greedy
tokens mlx-lm's own caches give, nothing is preempted, and the pool ends empty."""

from __future__ import annotations

import pytest
from mlx_lm.generate import BatchGenerator

from pagedkv.errors import OutOfBlocksError
from pagedkv.mlx_lm import PagedKVStore
from pagedkv.mlx_lm.admission import Admission, AdmittingBatchGenerator
from pagedkv.mlx_lm.batch import RequestPool
from tests.parity.models import assert_all_released, greedy, prompt_tokens, tiny_model

SYSTEM = prompt_tokens(21, seed=7)
REQUESTS = [(SYSTEM + prompt_tokens(1 + i % 5, seed=20 + i), 6 + (3 * i) % 10) for i in range(8)]
KW = dict(sampler=greedy, completion_batch_size=8, prefill_batch_size=4, prefill_step_size=8)


def _reference(model, requests):
    gen = BatchGenerator(model, **KW)
    uids = gen.insert([p for p, _ in requests], [m for _, m in requests])
    return _drain(gen, uids)[0]


def _drain(gen, uids, watch=None):
    tokens, reasons, running = {}, {}, []
    for _ in range(1000):
        _, responses = gen.next()
        running.append(len(gen._prompt_batch) + len(gen._generation_batch))
        if watch:
            watch()
        for r in responses:
            tokens.setdefault(uids.index(r.uid), []).append(r.token)
            if r.finish_reason:
                reasons[uids.index(r.uid)] = r.finish_reason
        if len(reasons) == len(uids):
            return tokens, reasons, running
    raise AssertionError(f"requests never finished: {sorted(reasons)} of {len(uids)}")


def _paged(model, num_blocks):
    store = PagedKVStore.for_model(model, num_blocks=num_blocks, block_size=4)
    pool = RequestPool(store)
    return store, pool, Admission(pool)


def _insert(gen, pool, admission, requests):
    uids = []
    for prompt, max_tokens in requests:
        request = admission.open(prompt)
        caches = pool.caches([request])
        uids += gen.insert([prompt[request.cached_tokens :]], [max_tokens], caches=[caches])
    return uids


def test_requests_wait_for_blocks_and_finish_exactly():
    model = tiny_model("llama")
    expected = _reference(model, REQUESTS)
    store, pool, admission = _paged(model, num_blocks=40)  # the budgets add up to ~100 blocks
    gen = AdmittingBatchGenerator(model, admission=admission, **KW)
    uids = _insert(gen, pool, admission, REQUESTS)
    tokens, reasons, running = _drain(gen, uids, watch=store.check_invariants)
    assert tokens == expected
    assert set(reasons.values()) <= {"length", "stop"}
    assert max(running) < len(REQUESTS)  # some waited: the pool cannot hold them all at once
    counts = admission.counts
    assert counts["queued"] > 0 and counts["admitted"] == len(REQUESTS)
    assert counts["preempted"] == 0 and counts["clamped"] == 0
    # Queued before the first request published SYSTEM, the others waited for it and hit it.
    assert counts["waited_for_prefix"] > 0
    assert store.cache.stats().prefix_hit_tokens >= 20 * (len(REQUESTS) - 1)
    gen.close()
    del gen
    assert_all_released(pool, store)


def test_a_budget_larger_than_the_pool_is_cut_to_fit():
    model = tiny_model("llama")
    prompt = prompt_tokens(10, seed=5)
    store, pool, admission = _paged(model, num_blocks=12)
    gen = AdmittingBatchGenerator(model, admission=admission, **KW)
    uids = _insert(gen, pool, admission, [(prompt, 500)])
    tokens, reasons, _ = _drain(gen, uids)
    cut = (12 - 1) * 4 - len(prompt)
    assert admission.counts["clamped"] == 1 and reasons == {0: "length"}
    assert tokens[0] == _reference(model, [(prompt, cut)])[0]
    gen.close()
    store.close()


def test_a_prompt_larger_than_the_pool_is_refused():
    model = tiny_model("llama")
    store, pool, admission = _paged(model, num_blocks=8)
    gen = AdmittingBatchGenerator(model, admission=admission, **KW)
    _insert(gen, pool, admission, [(prompt_tokens(40, seed=6), 4)])
    assert admission.counts["queued"] == 1 and pool.held_blocks() == 0
    with pytest.raises(OutOfBlocksError, match="can never fit"):
        gen.next()
    assert admission.counts["refused"] == 1 and pool.held_blocks() == 0
    store.check_invariants()
    store.close()
