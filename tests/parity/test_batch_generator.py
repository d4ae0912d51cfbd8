"""mlx-lm's own `BatchGenerator`, unmodified, on paged caches: the same greedy tokens as with
mlx-lm's caches through inserts, prefix hits, removals mid-prompt and mid-decode; every request's
blocks come back when mlx-lm drops its caches (no release call exists), and nothing leaks."""

from __future__ import annotations

import copy
import gc

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator

from pagedkv.errors import InvalidArgumentError
from pagedkv.mlx_lm import PagedKVStore
from pagedkv.mlx_lm.batch import RequestPool
from tests.parity import zoo
from tests.parity.models import assert_all_released, greedy, prompt_tokens, tiny_model

SYSTEM = prompt_tokens(21, seed=7)  # shared by several requests: prefix hits on the paged side

# (step, action, argument): insert a prompt (with max_tokens) or remove the n-th inserted uid.
SCHEDULE = [
    (0, "insert", (SYSTEM + [5, 6, 7], 9)),
    (0, "insert", (prompt_tokens(13, seed=1), 6)),
    (0, "insert", (prompt_tokens(30, seed=2), 11)),
    (1, "insert", (SYSTEM + [9] * 6, 7)),
    (2, "remove", 1),  # mid-decode or mid-prompt
    (3, "insert", (prompt_tokens(5, seed=3), 4)),
    (4, "insert", (SYSTEM + [1, 2], 8)),
    (6, "remove", 3),
    (9, "insert", (SYSTEM + [5, 6, 7, 8, 9, 10], 5)),  # hits the first request's blocks
    (9, "insert", (prompt_tokens(3, seed=4), 10)),
]


def llama_pool(num_blocks: int = 32):
    """A tiny llama, its store (blocks of 4) and a RequestPool over it."""
    model = tiny_model("llama")
    store = PagedKVStore.for_model(model, num_blocks=num_blocks, block_size=4)
    return model, store, RequestPool(store)


def _random_schedule(seed: int, inserts: int = 24):
    """Inserts over time (some sharing SYSTEM), removals of earlier requests at any stage."""
    import random

    rng = random.Random(seed)
    events = []
    for i in range(inserts):
        step = rng.randrange(0, 30)
        shared = rng.random() < 0.5
        tail = prompt_tokens(rng.randrange(1, 12), seed=100 + i)
        events.append((step, "insert", ((SYSTEM if shared else []) + tail, rng.randrange(1, 12))))
    events.sort(key=lambda e: e[0])
    for _ in range(inserts // 3):
        victim = rng.randrange(inserts // 2)
        events.append((events[victim][0] + rng.randrange(0, 6), "remove", victim))
    return sorted(events, key=lambda e: (e[0], e[1] == "remove"))


def _model(arch):
    return tiny_model(arch) if arch in ("llama", "qwen3") else zoo.build(arch)


def _run(model, pool=None, schedule=SCHEDULE):
    """Runs the schedule; returns {insertion index: tokens} (removed requests: what they got)."""
    gen = BatchGenerator(
        model, sampler=greedy, completion_batch_size=4, prefill_batch_size=2, prefill_step_size=8
    )
    uids, tokens, step = [], {}, 0
    while True:
        for _, action, arg in [e for e in schedule if e[0] == step]:
            if action == "insert":
                prompt, max_tokens = arg
                if pool is None:
                    (uid,) = gen.insert([prompt], max_tokens=[max_tokens])
                else:
                    caches, cached = pool.open(prompt)
                    (uid,) = gen.insert([prompt[cached:]], [max_tokens], caches=[caches])
                    del caches
                uids.append(uid)
            else:
                gen.remove([uids[arg]])
        _, responses = gen.next()
        for r in responses:
            tokens.setdefault(uids.index(r.uid), []).append(r.token)
        step += 1
        busy = len(gen._unprocessed_sequences) + len(gen._prompt_batch) + len(gen._generation_batch)
        if step > max(e[0] for e in schedule) and not busy:
            break
        assert step < 200
    gen.close()
    return tokens


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_batch_generator_matches_mlx_lm(arch):
    model = _model(arch)
    expected = _run(model)
    store = PagedKVStore.for_model(model, num_blocks=64, block_size=4)
    pool = RequestPool(store)
    got = _run(model, pool)
    assert got == expected
    assert sum(len(t) for t in got.values()) > 40
    gc.collect()
    pool.reap()
    assert pool.held_blocks() == 0  # only cached prefix blocks remain
    assert pool.released == pool.opened >= 8  # forks (batch splits) count too
    assert store.cache.stats().prefix_hit_tokens >= 20  # the shared system prompt hit
    assert store.routed_calls > 0  # decode attention answered from the pools
    store.check_invariants()
    store.close()


def test_many_inserts_and_removals():
    model = tiny_model("qwen3")
    schedule = _random_schedule(seed=3)
    expected = _run(model, schedule=schedule)
    store = PagedKVStore.for_model(model, num_blocks=160, block_size=4)
    pool = RequestPool(store)
    assert _run(model, pool, schedule) == expected
    assert_all_released(pool, store)


def test_protocol_edits_and_release():
    model, store, pool = llama_pool()
    a, _ = pool.open(prompt_tokens(9, seed=1))
    b, _ = pool.open(prompt_tokens(6, seed=2))
    merged = [ca.merge([ca, cb]) for ca, cb in zip(a, b)]
    del a, b
    model(mx.array([prompt_tokens(9, seed=1)[:8]] * 2), cache=merged)  # no prepare: both real
    assert [c.size() for c in merged] == [8, 8]
    assert merged[0].state[0] is store.cache.storage.keys[0]  # the pool itself, no copy
    held = pool.held_blocks()
    fork = copy.deepcopy(merged)  # forks share every block
    assert pool.held_blocks() == held
    assert fork[0].nbytes == merged[0].nbytes > 0
    with pytest.raises(InvalidArgumentError):
        merged[0].merge([merged[0].extract(0), merged[0].extract(0)])
    for layer in merged:
        layer.filter([1])
    del fork, layer
    gc.collect()
    assert pool.reap() == 3  # two forks and the filtered-out request
    single = [c.extract(0) for c in merged]
    del merged
    assert pool.reap() == 0  # the extracted cache still owns the request
    del single
    gc.collect()
    assert pool.reap() == 1 and pool.held_blocks() == 0
    store.check_invariants()
    store.close()


def test_an_error_mid_step_releases_every_block():
    """Without admission a step can run out of blocks mid-forward: mlx-lm raises, the batch is
    dropped, and its requests' blocks all come back; the store's invariants hold throughout."""
    from pagedkv.errors import OutOfBlocksError

    model, store, pool = llama_pool(12)
    gen = BatchGenerator(model, sampler=greedy, prefill_batch_size=4)
    for seed in range(3):
        caches, _ = pool.open(prompt_tokens(9, seed=seed))
        gen.insert([prompt_tokens(9, seed=seed)], [40], caches=[caches])
    del caches
    with pytest.raises(OutOfBlocksError):
        for _ in range(60):
            gen.next()
    store.check_invariants()
    del gen
    assert_all_released(pool, store)


@pytest.mark.parametrize(
    "length, at, count",
    [(11, 6, 4), (11, 2, 4), (4, 2, 2)],  # the last two inside block 0, the first handed out
)
def test_a_fork_mid_prompt_writes_fresh_blocks(length, at, count):
    """A deep copy made mid-prompt shares the blocks reserved for the rest of the prompt; while
    the original lives, each side's next write gets blocks of its own (no NotWritableError, and
    neither sees the other's K/V)."""
    model, store, pool = llama_pool()
    prompt = prompt_tokens(length, seed=9)
    original, _ = pool.open(prompt)
    model(mx.array([prompt[:at]]), cache=original)
    fork = copy.deepcopy(original)
    out_fork = model(mx.array([prompt[at : at + count]]), cache=fork)
    out_original = model(mx.array([prompt[at : at + count]]), cache=original)
    assert mx.allclose(out_fork, out_original, atol=1e-5).item()
    assert fork[0].sessions[0].seqs != original[0].sessions[0].seqs
    store.check_invariants()
    del fork, original
    gc.collect()
    assert pool.reap() == 2 and pool.held_blocks() == 0
    store.close()


def test_a_queued_request_opened_then_unopened_holds_nothing_and_opens_again():
    """Admission opens a queued request, and undoes it when the prefix it now pins breaks the
    promise it was admitted on: the request holds no block, expects `cached` tokens, and opens
    again later as if never opened."""
    _, store, pool = llama_pool()
    tokens = prompt_tokens(9, seed=4)
    request = pool.queue(tokens)
    layers = len(request.offsets)
    assert pool.open_queued(request) == 0 and pool.held_blocks() > 0
    pool.unopen(request, 0)
    assert request.seqs is None and request.offsets == [0] * layers
    assert pool.held_blocks() == 0 and pool.opened == 0 and not pool.live
    store.check_invariants()
    assert pool.open_queued(request) == 0 and pool.opened == 1
    request.close()
    assert pool.held_blocks() == 0
    store.close()


def test_a_batch_update_with_rows_for_another_batch_is_refused_unchanged():
    _, store, pool = llama_pool()
    a, _ = pool.open(prompt_tokens(5, seed=1))
    b, _ = pool.open(prompt_tokens(5, seed=2))
    merged = a[0].merge([a[0], b[0]])
    heads, dim = store.layer_shapes[0][:2]
    keys = mx.zeros((2, heads, 3, dim))
    before = (store.cache.snapshot(), [list(s.offsets) for s in merged.sessions])
    for bad_values in (mx.zeros((1, heads, 3, dim)), mx.zeros((3, heads, 3, dim))):
        with pytest.raises(InvalidArgumentError, match="rows for 2 requests"):
            merged.update_and_fetch(keys, bad_values)
        with pytest.raises(InvalidArgumentError, match="rows for 2 requests"):
            merged.update_and_fetch(bad_values, keys)
    assert (store.cache.snapshot(), [list(s.offsets) for s in merged.sessions]) == before
    store.close()


def test_extending_a_batch_keeps_the_prompt_lengths_of_the_rows_that_have_them():
    """mlx-lm merges batches with `extend`; a batch prepared with right-padded prompt lengths
    keeps them for its rows (rows of a batch without them have no prompt left to pad): a
    padded chunk then writes each row's real positions only."""
    _, store, pool = llama_pool()
    a, _ = pool.open(prompt_tokens(5, seed=1))
    b, _ = pool.open(prompt_tokens(5, seed=2))
    first, second = a[0], b[0]
    second.prepare(lengths=[2])  # its row has 2 real positions in the next 3-position chunk
    first.extend(second)
    heads, dim = store.layer_shapes[0][:2]
    rows = mx.ones((2, heads, 3, dim))
    before = [s.offsets[first.slot] for s in first.sessions]
    first.update_and_fetch(rows, rows)
    after = [s.offsets[first.slot] for s in first.sessions]
    assert [n - m for n, m in zip(after, before)] == [0, 2]
    c, _ = pool.open(prompt_tokens(5, seed=3))  # the other way round: lengths, then none
    d, _ = pool.open(prompt_tokens(5, seed=4))
    prepared, plain = c[0], d[0]
    prepared.prepare(lengths=[1])
    prepared.extend(plain)
    prepared.update_and_fetch(mx.ones((2, heads, 3, dim)), mx.ones((2, heads, 3, dim)))
    assert [s.offsets[prepared.slot] for s in prepared.sessions] == [1, 0]
    store.close()


def test_a_batched_prefill_publishes_each_finished_prompt():
    """A prompt written by a batched (ragged) prefill chunk is published once every layer holds
    it, as a single request's is: the next request with that prompt shares its full blocks."""
    model, store, pool = llama_pool()
    prompts = [prompt_tokens(9, seed=1), prompt_tokens(9, seed=2)]
    a, _ = pool.open(prompts[0])
    b, _ = pool.open(prompts[1])
    merged = [ca.merge([ca, cb]) for ca, cb in zip(a, b)]
    model(mx.array(prompts), cache=merged)
    for prompt in prompts:
        again = store.open(prompt)
        assert again.cached_tokens == 8  # two full blocks of 4; the last token is fed again
        again.close()
    store.close()


def test_right_padded_prompts_write_their_real_positions_over_several_chunks():
    """prepare(lengths=[5, 3]) then two 3-position chunks: the first writes 3 and 3, the second
    2 and 0 (the rest is padding mlx-lm discards); nothing past a prompt's length is reserved."""
    _, store, pool = llama_pool()
    a, _ = pool.open(prompt_tokens(5, seed=1))
    b, _ = pool.open(prompt_tokens(3, seed=2))
    merged = a[0].merge([a[0], b[0]])
    merged.prepare(lengths=[5, 3])
    heads, dim = store.layer_shapes[0][:2]
    rows = mx.ones((2, heads, 3, dim))
    for want in ([3, 3], [5, 3]):
        merged.update_and_fetch(rows, rows)
        assert [s.offsets[merged.slot] for s in merged.sessions] == want
    lengths = [store.cache.sequence_length(s.seqs[0]) for s in merged.sessions]
    assert lengths == [5, 3]
    store.close()


def test_a_chunk_that_needs_exactly_the_free_blocks_is_taken():
    """Two 4-token prompts (a block each) in a 4-block pool, then an 8-position chunk: the 4
    positions past each prompt need one more block each, the last 2 free ones."""
    _, store, pool = llama_pool(4)
    a, _ = pool.open(prompt_tokens(4, seed=1))
    b, _ = pool.open(prompt_tokens(4, seed=2))
    assert store.cache.stats().free_blocks == 2
    merged = a[0].merge([a[0], b[0]])
    heads, dim = store.layer_shapes[0][:2]
    rows = mx.ones((2, heads, 8, dim))
    merged.update_and_fetch(rows, rows)
    assert [s.offsets[merged.slot] for s in merged.sessions] == [8, 8]
    assert store.cache.stats().free_blocks == 0
    store.close()


def test_merge_refuses_caches_of_another_layer_kind_or_store():
    model = tiny_model("llama")
    store = PagedKVStore.for_model(model, num_blocks=32, block_size=4)
    other = PagedKVStore.for_model(model, num_blocks=32, block_size=4)
    pool, other_pool = RequestPool(store), RequestPool(other)
    a, _ = pool.open(prompt_tokens(5, seed=1))
    b, _ = pool.open(prompt_tokens(5, seed=2))
    c, _ = other_pool.open(prompt_tokens(5, seed=3))
    for wrong in (b[1], c[0]):  # another layer; another store's
        with pytest.raises(InvalidArgumentError, match="one layer of one store"):
            a[0].merge([a[0], wrong])
    store.close()
    other.close()


def test_adopting_a_session_closes_it_and_closing_the_request_frees_its_blocks():
    _, store, pool = llama_pool()
    session = store.open(prompt_tokens(6, seed=1))
    request = pool.adopt(session)
    assert session.closed and session.caches is None  # the request owns its sequences now
    assert pool.held_blocks() == 2
    request.close()
    assert request.closed and pool.held_blocks() == 0  # at once, not when collected
    with pytest.raises(InvalidArgumentError):
        request._require_open()
    request.close()  # twice: nothing more happens
    assert pool.released == 1
    store.close()
