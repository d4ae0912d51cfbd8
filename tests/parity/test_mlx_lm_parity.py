"""mlx-lm models on the paged cache produce exactly what they produce on mlx-lm's own KVCache.

Tiny random-weight llama, qwen3 and qwen2 models built from mlx-lm's classes; greedy decoding.
"""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from pagedkv.mlx_lm import UNKNOWN_TOKEN, PagedKVStore
from tests.parity.models import (
    ARCHITECTURES,
    greedy,
    paged_tokens,
    prompt_tokens,
    tiny_model,
    tiny_tokenizer,
)

TOKENS = 32


@pytest.fixture(params=sorted(ARCHITECTURES))
def model(request):
    return tiny_model(request.param)


def dense_tokens(model, prompt, max_tokens=TOKENS):
    return [
        t for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=greedy)
    ]


def test_cold_and_shared_prefix_requests_match_dense(model):
    store = PagedKVStore.for_model(model, num_blocks=64, block_size=8)
    system = prompt_tokens(37, seed=1)
    first = system + prompt_tokens(5, seed=2)
    second = system + prompt_tokens(9, seed=3)
    cold = store.open(first)
    assert cold.cached_tokens == 0
    assert paged_tokens(cold, model, TOKENS) == dense_tokens(model, first)
    shared = store.open(second)
    assert shared.cached_tokens == 32  # four full blocks of the system prompt
    assert len(shared.remaining_prompt) == len(second) - 32  # only the suffix is prefilled
    assert paged_tokens(shared, model, TOKENS) == dense_tokens(model, second)
    assert store.cache.stats().prefill_tokens_avoided == 32
    cold.close()
    shared.close()
    store.cache.check_invariants()


def test_float32_logits_match_within_1e4(model):
    prompt = prompt_tokens(21, seed=4)
    store = PagedKVStore.for_model(model, num_blocks=32, block_size=4)
    session = store.open(prompt)
    dense_cache = make_prompt_cache(model)
    dense = model(mx.array(prompt)[None], cache=dense_cache)
    paged = model(mx.array(prompt)[None], cache=session.caches)
    assert mx.abs(dense - paged).max().item() <= 1e-4
    token = mx.argmax(dense[:, -1:], axis=-1)
    for _ in range(8):  # decode steps
        dense = model(token, cache=dense_cache)
        paged = model(token, cache=session.caches)
        assert mx.abs(dense - paged).max().item() <= 1e-4
        token = mx.argmax(dense[:, -1:], axis=-1)


def test_batched_ragged_generation_equals_each_prompt_alone(model):
    store = PagedKVStore.for_model(model, num_blocks=96, block_size=8)
    system = prompt_tokens(24, seed=5)
    prompts = [system + prompt_tokens(n, seed=10 + n) for n in (3, 11, 6, 1)]
    prompts.append(prompt_tokens(13, seed=7))  # one without the shared prefix
    sessions, firsts = [], []
    for prompt in prompts:  # prefill one request at a time (the first commits the system prompt)
        session = store.open(prompt)
        logits = model(mx.array(session.remaining_prompt)[None], cache=session.caches)
        firsts.append(int(mx.argmax(logits[0, -1]).item()))
        sessions.append(session)
    assert [s.cached_tokens for s in sessions] == [0, 24, 24, 24, 0]
    batch_cache = store.batch(sessions)
    tokens = [[t] for t in firsts]
    for _ in range(TOKENS - 1):  # batched decode: one [B, 1] call per step, ragged offsets
        logits = model(mx.array([[seq[-1]] for seq in tokens]), cache=batch_cache)
        for row, token in enumerate(mx.argmax(logits[:, -1], axis=-1).tolist()):
            tokens[row].append(token)
    for prompt, generated in zip(prompts, tokens):
        assert generated == dense_tokens(model, prompt)
    store.cache.check_invariants()


def test_trim_then_regenerate_equals_never_having_generated(model):
    store = PagedKVStore.for_model(model, num_blocks=64, block_size=4)
    prompt = prompt_tokens(18, seed=8)
    warm = store.open(prompt)  # commits the prompt's full blocks
    paged_tokens(warm, model, 4)
    session = store.open(prompt)  # shares 16 tokens of cached, committed blocks with `warm`
    first = paged_tokens(session, model, 12)
    # generate_step feeds every token it yields (it runs one step ahead): the cache holds the
    # prompt and 12 generated tokens. Drop those and the prompt's last 3 tokens, which crosses
    # into the shared blocks: position 15 lives in a shared, indexed block (copied on rewrite).
    assert trim_prompt_cache(session.caches, 12 + 3) == 15
    assert store.cache.sequence_length(session.seq) == len(prompt) - 3
    again = [
        t
        for t, _ in generate_step(
            mx.array(prompt[-3:]), model, max_tokens=12, sampler=greedy, prompt_cache=session.caches
        )
    ]
    assert again == first == dense_tokens(model, prompt, 12)
    assert store.cache.stats().cow_copies >= 1
    # Re-fed positions past the trim are not known to hold the prompt: never labelled as it.
    assert store.cache.tokens(session.seq)[15:18] == (UNKNOWN_TOKEN,) * 3
    assert paged_tokens(warm, model, 4)  # the other request still reads intact blocks
    store.cache.check_invariants()


def test_stream_generate_runs_unchanged_with_the_paged_cache(model):
    tokenizer = tiny_tokenizer()
    prompt = prompt_tokens(20, seed=9)
    store = PagedKVStore.for_model(model, num_blocks=32, block_size=8)
    session = store.open(prompt)
    paged = [
        r.token
        for r in stream_generate(
            model,
            tokenizer,
            session.remaining_prompt,
            prompt_cache=session.caches,
            max_tokens=TOKENS,
            sampler=greedy,
        )
    ]
    dense = [
        r.token
        for r in stream_generate(model, tokenizer, prompt, max_tokens=TOKENS, sampler=greedy)
    ]
    assert paged == dense and len(paged) >= 1
    assert session.caches[0].nbytes > 0 and not session.caches[0].empty()


def test_adapter_errors_change_nothing(model):
    from pagedkv.errors import InvalidArgumentError, KVShapeError, OutOfBlocksError

    store = PagedKVStore.for_model(model, num_blocks=6, block_size=4)
    first, second = store.open(prompt_tokens(5, seed=11)), store.open(prompt_tokens(6, seed=12))
    for session in (first, second):
        model(mx.array(session.remaining_prompt)[None], cache=session.caches)
    batch = store.batch([first, second])
    before = store.cache.snapshot()
    with pytest.raises(InvalidArgumentError):  # several tokens per sequence in a batched call
        model(mx.array([[1, 2], [3, 4]]), cache=batch)
    with pytest.raises(KVShapeError):  # a batch of 3 against a cache of 2 sessions
        batch[0].update_and_fetch(mx.zeros((3, 2, 1, 16)), mx.zeros((3, 2, 1, 16)))
    assert store.cache.snapshot() == before
    with pytest.raises(OutOfBlocksError):  # 6 blocks hold 24 positions; this prompt needs 7
        store.open(prompt_tokens(25, seed=13))
    assert store.cache.snapshot() == before
    first.close()
    with pytest.raises(InvalidArgumentError):  # a closed session cannot be batched
        store.batch([first, second])
