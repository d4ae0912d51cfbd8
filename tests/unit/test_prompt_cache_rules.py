"""The rules of the paged prompt cache (pagedkv/mlx_lm/prompt_cache.py), the `LRUPromptCache`
that `pagedkv serve` hands mlx-lm's server: what it counts, which cache lists it learns a reply
from (and which it ignores), how much of a reply it learns, how `trim_to` meets a byte budget, and
what `len`, `nbytes`, `stats_by_type` and `counters` report. Each test drives the server's calls
directly on a tiny random llama (blocks of 4 tokens), so each rule is checked quickly."""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import ArraysCache, RotatingKVCache, make_prompt_cache  # noqa: E402

from pagedkv.errors import OutOfBlocksError  # noqa: E402
from pagedkv.mlx_lm import UNKNOWN_TOKEN  # noqa: E402
from pagedkv.mlx_lm.prompt_cache import PagedPromptCache, _learn, _request_of  # noqa: E402
from tests.parity.models import prompt_tokens, tiny_model  # noqa: E402

SIZE = 4
KEY = "tiny"  # the server's model key
PROMPT = prompt_tokens(10, seed=0)  # two full blocks and a partial one


@pytest.fixture
def served():
    """Builds PagedPromptCaches (each on its own tiny llama) and gives every model its own
    attention back afterwards."""
    built = []

    def build(num_blocks: int = 16, block_size: int = SIZE, model=None):
        model = model if model is not None else tiny_model("llama")
        prompt_cache = PagedPromptCache(lambda key: model, num_blocks, block_size)
        built.append(prompt_cache)
        return prompt_cache, model

    yield build
    for prompt_cache in built:
        if prompt_cache.store is not None:
            prompt_cache.store.close()


def _run(model, caches, rest: list[int], reply: int) -> list[int]:
    """Feeds `rest` (one prefill) and then `reply` greedy tokens one at a time, as mlx-lm does;
    returns the reply (every token of it fed, so the caches hold prompt + reply)."""
    logits = model(mx.array([rest]), cache=caches)
    tokens = []
    for _ in range(reply):
        token = int(mx.argmax(logits[0, -1]).item())
        tokens.append(token)
        logits = model(mx.array([[token]]), cache=caches)
    mx.eval(logits)
    return tokens


def _finished(prompt_cache, model, prompt=PROMPT, reply: int = 6):
    """A request served to the end: (its caches, its reply)."""
    caches, rest = prompt_cache.fetch_nearest_cache(KEY, prompt)
    return caches, _run(model, caches, rest, reply)


def _released(prompt_cache) -> None:
    """Frees the blocks of every request mlx-lm dropped (as the next store operation would)."""
    gc.collect()
    prompt_cache.pool.reap()


def _counters(**nonzero) -> dict:
    return dict(
        dict(requests=0, unpaged=0, hit_tokens=0, learned_tokens=0, inserts=0, refused=0),
        **nonzero,
    )


# ---- before any request -------------------------------------------------------------------------


def test_before_the_first_request_nothing_is_held_or_counted():
    """Rule: a new prompt cache builds no store until the first request; it reports zero blocks,
    zero bytes and zero counts, a trim has nothing to do, and blocks default to 16 tokens."""
    prompt_cache = PagedPromptCache(lambda key: tiny_model("llama"), 8)
    assert prompt_cache.block_size == 16
    assert (len(prompt_cache), prompt_cache.nbytes) == (0, 0)
    assert prompt_cache.stats_by_type() == {"paged-cached": {"n_sequences": 0, "n_bytes": 0}}
    assert prompt_cache.counters() == prompt_cache.stats() == _counters()
    prompt_cache.trim_to(n_bytes=0)  # mlx-lm may trim before any request: nothing to evict
    assert prompt_cache.store is None


# ---- fetch_nearest_cache ------------------------------------------------------------------------


def test_each_fetch_is_one_request_and_adds_the_prompt_tokens_it_hits(served):
    """Rule: every fetch counts one request; hit_tokens adds the prompt tokens served from cached
    blocks (0 for a new prompt, then the two full blocks of a repeated 10-token prompt)."""
    prompt_cache, model = served()
    caches, _ = _finished(prompt_cache, model, reply=0)
    assert prompt_cache.counters()["requests"] == 1
    del caches
    _, rest = prompt_cache.fetch_nearest_cache(KEY, PROMPT)
    assert rest == PROMPT[8:]
    counters = prompt_cache.counters()
    assert (counters["requests"], counters["hit_tokens"], counters["unpaged"]) == (2, 8, 0)


def test_a_model_the_store_cannot_run_is_left_to_mlx_lms_own_caches():
    """Rule: for a model pagedkv cannot page (here one with only recurrent state) the fetch says
    (None, the whole prompt), so mlx-lm builds its own caches; it counts one request, unpaged."""

    class Recurrent:
        def make_cache(self):
            return [ArraysCache(size=2)]

    prompt_cache = PagedPromptCache(lambda key: Recurrent(), 8, SIZE)
    assert prompt_cache.fetch_nearest_cache(KEY, PROMPT) == (None, PROMPT)
    assert prompt_cache.store is None
    assert prompt_cache.counters() == _counters(requests=1, unpaged=1)


# ---- insert_cache: which cache lists are learned from -------------------------------------------


def test_a_finished_reply_is_learned_and_the_next_turn_hits_its_blocks(served):
    """Rule: inserting a finished request's caches learns the reply tokens the model was fed (the
    last sampled token, never fed, is not) and publishes their full blocks: the next turn, whose
    prompt repeats prompt + reply, hits 16 tokens (4 full blocks)."""
    prompt_cache, model = served()
    caches, reply = _finished(prompt_cache, model, reply=6)
    request = _request_of(caches)
    prompt_cache.insert_cache(KEY, PROMPT + reply + [7], caches)  # all_tokens: one not yet fed
    assert request.prompt == PROMPT + reply
    counters = prompt_cache.counters()
    assert (counters["inserts"], counters["learned_tokens"]) == (1, 6)
    assert all(cache.sessions == [] for cache in caches)  # the caller's list holds nothing more
    del caches, request
    _, rest = prompt_cache.fetch_nearest_cache(KEY, PROMPT + reply + [7, 8])
    assert rest == [7, 8]
    assert prompt_cache.counters()["hit_tokens"] == 16


def test_a_reply_of_a_model_whose_every_layer_is_windowed_is_learned(served):
    """Rule: the request is found from any paged layer's cache, window layers included: a model
    whose every cache is a RotatingKVCache gets its reply learned too."""
    model = tiny_model("llama")

    class Windowed(type(model)):
        def make_cache(self):
            return [RotatingKVCache(max_size=8) for _ in self.layers]

    model.__class__ = Windowed
    prompt_cache, _ = served(model=model)
    caches, reply = _finished(prompt_cache, model, reply=3)
    assert type(caches[0]).__name__ == "BatchWindowCache"
    prompt_cache.insert_cache(KEY, PROMPT + reply, caches)
    counters = prompt_cache.counters()
    assert (counters["inserts"], counters["learned_tokens"]) == (1, 3)


def test_cache_lists_that_are_not_one_request_of_this_store_are_ignored(served):
    """Rule: insert_cache learns only from a list of caches over exactly one open request of this
    prompt cache's pool. None, mlx-lm's own caches, another store's request, a batch of two
    requests and a closed request are ignored: nothing counted, learned or taken from them."""
    prompt_cache, model = served()
    other, other_model = served()
    first, reply = _finished(prompt_cache, model, reply=2)
    second, _ = _finished(prompt_cache, model, prompt=prompt_tokens(9, seed=1), reply=2)
    foreign, _ = _finished(other, other_model, reply=2)
    batch = prompt_cache.pool.caches([_request_of(first), _request_of(second)])
    closed, _ = _finished(prompt_cache, model, prompt=prompt_tokens(7, seed=2), reply=2)
    _request_of(closed).close()
    tokens = PROMPT + reply
    for ignored in (None, make_prompt_cache(model), foreign, batch, closed):
        prompt_cache.insert_cache(KEY, tokens, ignored)
    counters = prompt_cache.counters()
    assert (counters["inserts"], counters["learned_tokens"]) == (0, 0)
    assert _request_of(first).prompt == PROMPT
    assert [len(cache.sessions) for cache in batch] == [2, 2]
    assert len(foreign[0].sessions) == 1


def test_tokens_that_do_not_start_with_the_requests_prompt_teach_nothing(served):
    """Rule: a reply is learned only on top of the request's own prompt; tokens whose start
    differs (a key for another prompt) are not written into the request's sequence."""
    prompt_cache, model = served()
    caches, reply = _finished(prompt_cache, model, reply=4)
    request = _request_of(caches)
    wrong = [(t + 1) % 250 for t in PROMPT] + reply
    prompt_cache.insert_cache(KEY, wrong, caches)
    assert prompt_cache.counters()["learned_tokens"] == 0
    assert request.prompt == PROMPT
    held = prompt_cache.store.cache._sequence(request.seqs[0]).tokens
    assert list(held[10:14]) == [UNKNOWN_TOKEN] * 4


def test_a_prompt_without_reply_tokens_learns_nothing_mid_prompt_publishes_nothing(served):
    """Rule: inserting at the prompt's end learns 0 tokens (its full blocks are published: the
    next fetch hits them); inserting mid-prompt (a segment end) learns and publishes nothing."""
    prompt_cache, model = served()
    caches, _ = _finished(prompt_cache, model, reply=0)
    prompt_cache.insert_cache(KEY, PROMPT, caches)
    assert prompt_cache.counters()["learned_tokens"] == 0
    assert prompt_cache.counters()["inserts"] == 1
    del caches

    other = prompt_tokens(10, seed=5)
    caches, rest = prompt_cache.fetch_nearest_cache(KEY, other)
    _run(model, caches, rest[:6], reply=0)  # six of ten prompt tokens fed
    prompt_cache.insert_cache(KEY, other[:6], caches)
    assert prompt_cache.counters()["learned_tokens"] == 0
    del caches
    _released(prompt_cache)
    assert prompt_cache.fetch_nearest_cache(KEY, PROMPT)[1] == PROMPT[8:]
    assert prompt_cache.fetch_nearest_cache(KEY, other)[1] == other


def test_learning_never_overwrites_a_known_token_or_grows_a_sequence(served):
    """Rule (_learn): only positions the store reserved as UNKNOWN_TOKEN are written. Tokens past
    what the sequence holds, or a position past the prompt that holds a known token, make it
    learn nothing (0) and change nothing."""
    prompt_cache, model = served()
    caches, reply = _finished(prompt_cache, model, reply=3)
    request, store = _request_of(caches), prompt_cache.store
    held = store.cache._sequence(request.seqs[0]).tokens
    assert len(held) == 13

    assert _learn(store, request, PROMPT + reply + [1, 2, 3, 4]) == 0  # 17 > 13 held
    held[11] = 5  # a known token past the prompt
    before = list(held)
    assert _learn(store, request, PROMPT + reply) == 0
    assert list(held) == before and request.prompt == PROMPT


# ---- trim_to, len, nbytes, stats_by_type --------------------------------------------------------


def test_trim_to_evicts_cached_blocks_down_to_the_byte_budget(served):
    """Rule: trim_to(n_bytes=B) leaves at most B // bytes_per_block cached blocks (evicting just
    the excess); without n_bytes it does nothing; a negative budget (mlx-lm passes total - active)
    evicts every cached block."""
    prompt_cache, model = served()
    caches, reply = _finished(prompt_cache, model, reply=6)
    prompt_cache.insert_cache(KEY, PROMPT + reply, caches)
    del caches
    _released(prompt_cache)
    per_block = prompt_cache.store.config.bytes_per_block
    assert len(prompt_cache) == 4  # 16 tokens: 4 full blocks, held by nobody
    prompt_cache.trim_to(n_sequences=1)
    assert len(prompt_cache) == 4
    prompt_cache.trim_to(n_bytes=3 * per_block + 1)
    assert len(prompt_cache) == 3
    prompt_cache.trim_to(n_bytes=2 * per_block)  # one block over: exactly one evicted
    assert len(prompt_cache) == 2
    prompt_cache.trim_to(n_bytes=-per_block)
    assert len(prompt_cache) == 0


def test_len_nbytes_and_stats_by_type_count_cached_and_held_blocks(served):
    """Rule: len and nbytes count the cached blocks (published, held by nobody) and their bytes;
    stats_by_type adds the blocks live requests hold, and their bytes."""
    prompt_cache, model = served()
    caches, reply = _finished(prompt_cache, model, reply=6)
    prompt_cache.insert_cache(KEY, PROMPT + reply, caches)
    del caches
    live, _ = _finished(prompt_cache, model, prompt=prompt_tokens(11, seed=3), reply=2)
    _released(prompt_cache)
    per_block = prompt_cache.store.config.bytes_per_block
    assert (len(prompt_cache), prompt_cache.nbytes) == (4, 4 * per_block)
    assert prompt_cache.stats_by_type() == {
        "paged-cached": {"n_sequences": 4, "n_bytes": 4 * per_block},
        "paged-in-use": {"n_sequences": 4, "n_bytes": 4 * per_block},  # 13 positions
    }
    assert prompt_cache.stats()["in_use_blocks"] == 4 and len(live) == 2


# ---- counters -----------------------------------------------------------------------------------


def test_live_requests_are_those_opened_and_not_yet_dropped(served):
    """Rule: live_requests counts requests opened and still held by mlx-lm: a dropped request
    stops counting at once (before its blocks are freed), and stays uncounted once freed."""
    prompt_cache, model = served()
    first, _ = _finished(prompt_cache, model, reply=1)
    second, _ = _finished(prompt_cache, model, prompt=prompt_tokens(5, seed=4), reply=1)
    assert prompt_cache.counters()["live_requests"] == 2
    del first
    gc.collect()  # dropped: queued for freeing, not yet freed
    assert prompt_cache.counters()["live_requests"] == 1
    assert prompt_cache.stats()["live_requests"] == 1  # stats frees the dropped blocks
    assert prompt_cache.pool.released == 1 and len(second) == 2


def test_refused_adds_the_servers_refusals_to_admissions(served):
    """Rule: `refused` is the requests the server refused before admission (serve.py counts them
    in counts["refused"]) plus those admission itself refused."""
    prompt_cache, model = served(num_blocks=8)
    huge = prompt_tokens(40, seed=6)  # 10 blocks + 1 > 8: can never fit
    caches, rest = prompt_cache.fetch_nearest_cache(KEY, huge)
    with pytest.raises(OutOfBlocksError):
        prompt_cache.admission.gate([[0, [rest], 4, caches, []]])
    prompt_cache.counts["refused"] += 2  # as serve.py's prompt check does
    assert prompt_cache.admission.counts["refused"] == 1
    assert prompt_cache.counters()["refused"] == 3
