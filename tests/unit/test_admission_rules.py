"""The rules of capacity admission (pagedkv/mlx_lm/admission.py, docs/adr/0003-admission.md),
each pinned at its boundary: when a prompt can never fit, how many blocks a request is promised,
when a queued request waits for a running one to publish a shared prefix, what happens when a
request cannot be opened after all, how mlx-lm's feed is moved to the prefix really cached, and
how the generator's gate, `remove` and `admission` behave. Small stores without a model (blocks
of 4 tokens, nothing written), so each rule is checked directly and quickly."""

from __future__ import annotations

import contextlib
import signal

import pytest

pytest.importorskip("mlx_lm")

from mlx_lm.models.cache import KVCache  # noqa: E402

from pagedkv.config import Config  # noqa: E402
from pagedkv.errors import OutOfBlocksError  # noqa: E402
from pagedkv.mlx_lm import PagedKVStore  # noqa: E402
from pagedkv.mlx_lm.admission import (  # noqa: E402
    Admission,
    AdmittingBatchGenerator,
    _refeed,
    _request_of,
    require_fits,
)
from pagedkv.mlx_lm.batch import RequestPool  # noqa: E402

SIZE = 4
A = list(range(100, 112))  # a 12-token prompt; A[:8] is two full blocks


def _admission(num_blocks: int = 16):
    """A store (no model, nothing written), its RequestPool and an Admission over it."""
    store = PagedKVStore(Config(num_blocks=num_blocks, block_size=SIZE, head_dim=2))
    pool = RequestPool(store)
    return store, pool, Admission(pool)


def _publish(store, tokens) -> None:
    """Puts `tokens`' full blocks in the prefix index, held by nobody (cached, evictable)."""
    for cache in store.groups:
        seq, _ = cache.add_sequence(tokens)
        cache.commit(seq)
        cache.free(seq)


def _running(pool, tokens):
    """A live request holding the blocks of `tokens` (opened directly: not admitted) and the
    caches that keep it alive."""
    caches, _ = pool.open(tokens)
    return caches[0].sessions[0], caches


def _item(pool, request, max_tokens: int, uid: int = 0) -> list:
    """mlx-lm's queued sequence for `request`: (uid, segments, max_tokens, caches, all_tokens)."""
    rest = request.prompt[request.cached_tokens :]
    segments = [rest[:-1], rest[-1:]] if len(rest) > 1 else [rest]
    return [
        uid,
        segments,
        max_tokens,
        pool.caches([request]),
        request.prompt[: request.cached_tokens],
    ]


@contextlib.contextmanager
def _within(seconds: float):
    """Fails (instead of hanging) when the body does not finish in time."""

    def expired(signum, frame):
        raise AssertionError(f"did not finish within {seconds} s (an endless loop?)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- require_fits: a prompt that alone exceeds the pool -----------------------------------------


def test_a_prompt_whose_blocks_plus_a_tail_block_fill_the_pool_exactly_fits():
    """Rule: a prompt fits when its blocks plus one (a copied shared tail) are at most the pool;
    7 blocks of prompt + 1 in an 8-block pool is exactly full and allowed."""
    require_fits(28, SIZE, 8)  # 7 + 1 == 8
    require_fits(25, SIZE, 8)  # a partial last block counts whole: still 7 + 1
    require_fits(1, SIZE, 2)  # the smallest pool that holds anything


def test_one_token_more_than_fits_is_refused():
    """Rule: one block more than the pool (a 29-token prompt: 8 blocks + 1 > 8) can never run."""
    with pytest.raises(OutOfBlocksError, match="29-token prompt can never fit the 8-block pool"):
        require_fits(29, SIZE, 8)
    with pytest.raises(OutOfBlocksError):
        require_fits(1, SIZE, 1)  # the tail block alone leaves no room


# ---- counts ---------------------------------------------------------------------------------


def test_every_count_starts_at_zero():
    """Rule: a new Admission has admitted, queued, refused, ... nothing (the server reports these
    counters as they are)."""
    _, _, admission = _admission()
    assert admission.counts == dict(
        queued=0,
        admitted=0,
        preempted=0,
        clamped=0,
        refused=0,
        cancelled=0,
        waited_for_prefix=0,
    )


# ---- _need: the blocks a request is promised ------------------------------------------------


def test_a_queued_request_without_a_budget_is_promised_its_prompt_and_a_tail_block():
    """Rule: with no max_tokens yet, the promise is the prompt's blocks plus one (8 tokens:
    2 + 1 = 3), nothing for generated tokens."""
    store, pool, admission = _admission()
    request = pool.queue(A[:8])
    assert request.max_tokens is None and request.cached_tokens == 0
    assert admission._need(0, request) == 3
    request.max_tokens = 1
    assert admission._need(0, request) == 4  # 9 positions: 3 blocks + 1


def test_a_queued_request_is_promised_its_budget_less_the_blocks_it_expects_to_hit():
    """Rule: ceil((prompt + max_tokens) / size) + 1 - expected hit blocks: a 10-token prompt
    with 8 tokens cached and max_tokens 6 needs 4 + 1 - 2 = 3 blocks."""
    store, pool, admission = _admission()
    _publish(store, A[:8])
    request = pool.queue(A[:10])
    assert request.cached_tokens == 8
    request.max_tokens = 6
    assert admission._need(0, request) == 3
    request.max_tokens = 7  # 17 positions: one block more
    assert admission._need(0, request) == 4


def test_an_open_request_is_promised_its_budget_less_the_blocks_it_holds_never_less_than_none():
    """Rule: an opened request needs ceil(end / size) + 1 less the blocks it holds, and never a
    negative number (nor one) once it holds its whole budget or more."""
    store, pool, admission = _admission()
    request, caches = _running(pool, A)  # 12 tokens: 3 blocks held
    request.max_tokens = 4  # 16 positions: 4 blocks + 1
    assert admission._need(0, request) == 2
    request.max_tokens = None  # the prompt alone: 3 + 1 - 3
    assert admission._need(0, request) == 1
    for cache, seq in zip(store.groups, request.seqs):
        cache.extend(seq, [7] * 5)  # 17 tokens: 5 blocks held, more than 3 + 1
    assert len(store.cache.block_table_array(request.seqs[0])) == 5
    assert admission._need(0, request) == 0
    del caches


# ---- _follows: waiting for a running request to publish a shared prefix ----------------------


def test_a_request_sharing_one_full_block_with_a_leader_waits_and_is_counted_once():
    """Rule: sharing exactly one full block (4 tokens) more than the store holds is reason to
    wait; `waited_for_prefix` counts that one wait."""
    store, pool, admission = _admission()
    request = pool.queue(A[:10])
    leader = pool.queue(A[:4] + [1, 2, 3, 4, 5])
    assert admission._follows(request, [request, leader]) is True
    assert admission.counts["waited_for_prefix"] == 1


def test_sharing_less_than_a_block_is_no_reason_to_wait():
    """Rule: three common tokens (under one block) can never be shared: no wait, no count."""
    store, pool, admission = _admission()
    request = pool.queue(A[:10])
    leader = pool.queue(A[:3] + [1, 2, 3, 4, 5, 6])
    assert admission._follows(request, [leader]) is False
    assert admission.counts["waited_for_prefix"] == 0


def test_a_shared_prefix_the_store_already_holds_is_no_reason_to_wait():
    """Rule: only full shared blocks beyond the cached prefix count: 7 common tokens (one full
    block) with that block already cached leaves nothing to wait for."""
    store, pool, admission = _admission()
    _publish(store, A[:4])
    request = pool.queue(A[:10])
    assert request.cached_tokens == 4
    leader = pool.queue(A[:7] + [1, 2, 3])
    assert admission._follows(request, [leader]) is False
    # one more common token makes a second full block the store lacks: then it waits
    assert admission._follows(request, [pool.queue(A[:8] + [1, 2])]) is True


def test_the_last_prompt_token_is_never_counted_as_shareable():
    """Rule: a prefix hit always leaves the last prompt token to feed, so a 4-token prompt that
    is all one leader's first block cannot hit it (no wait), while a 5-token prompt can."""
    store, pool, admission = _admission()
    leader = pool.queue(A)
    assert admission._follows(pool.queue(A[:4]), [leader]) is False
    assert admission._follows(pool.queue(A[:5]), [leader]) is True
    assert admission.counts["waited_for_prefix"] == 1


def test_an_opened_request_never_waits_for_a_prefix():
    """Rule: only queued requests wait; one already opened holds its own prompt blocks."""
    store, pool, admission = _admission()
    request, caches = _running(pool, A[:10])
    leader = pool.queue(A[:8] + [1, 2, 3])
    assert admission._follows(request, [leader]) is False
    assert admission.counts["waited_for_prefix"] == 0
    del caches


# ---- _gate: who is admitted -----------------------------------------------------------------


def test_a_request_that_fits_is_admitted_at_once():
    """Rule: a queued request whose promise fits is opened and admitted in the same gate call."""
    store, pool, admission = _admission()
    request = admission.open(A[:10])
    item = _item(pool, request, max_tokens=4)
    assert admission.gate([item]) == ([item], [])
    assert request.admitted and request.seqs is not None and request.max_tokens == 4
    assert admission.counts["admitted"] == 1 and pool.held_blocks() == 3


def test_an_admitted_request_passes_again_without_being_opened_or_counted_twice():
    """Rule: a request already admitted (an item mlx-lm queues again) is admitted as it is: not
    opened again, not counted again, and `open` counted the one queued request."""
    store, pool, admission = _admission()
    request = admission.open(A[:10])
    item = _item(pool, request, max_tokens=4)
    admission.gate([item])
    seqs = request.seqs
    assert admission.gate([item]) == ([item], [])
    assert request.seqs is seqs and pool.held_blocks() == 3
    assert admission.counts["admitted"] == 1 and admission.counts["queued"] == 1


def test_a_request_waits_for_what_admitted_requests_were_promised():
    """Rule: the free blocks are those available less every admitted request's outstanding
    promise; a request fits when its promise is at most that (equal included)."""
    store, pool, admission = _admission(num_blocks=16)
    first = admission.open(list(range(8)))
    admission.gate([_item(pool, first, max_tokens=20)])  # 8 promised, 2 held: 6 outstanding
    assert first.admitted and pool.held_blocks() == 2
    over = admission.open(list(range(50, 58)))  # 14 available - 6 = 8 free
    waiting = _item(pool, over, max_tokens=24, uid=1)  # 32 positions: 8 + 1 = 9 blocks
    assert admission.gate([waiting]) == ([], [waiting])
    assert over.seqs is None and admission.counts["admitted"] == 1
    fits = _item(pool, over, max_tokens=20, uid=1)  # 28 positions: 7 + 1 = 8 blocks
    assert admission.gate([fits]) == ([fits], [])
    assert over.admitted and pool.held_blocks() == 4


def test_a_budget_beyond_the_pool_is_cut_to_exactly_what_fits():
    """Rule: max_tokens is cut to (num_blocks - 1) * size - prompt (here 7 * 4 - 10 = 18), in
    mlx-lm's item too, and counted as clamped; a budget of exactly that is left alone."""
    store, pool, admission = _admission(num_blocks=8)
    request = admission.open(A[:10])
    item = _item(pool, request, max_tokens=18)
    assert admission.gate([item]) == ([item], [])
    assert item[2] == 18 and request.max_tokens == 18 and admission.counts["clamped"] == 0
    request.close()
    request = admission.open(A[:10])
    item = _item(pool, request, max_tokens=19)
    assert admission.gate([item]) == ([item], [])
    assert item[2] == 18 and request.max_tokens == 18 and admission.counts["clamped"] == 1
    assert pool.held_blocks() == 3


def test_a_prompt_that_can_never_fit_is_refused_and_counted_once():
    """Rule: the gate raises OutOfBlocksError for a prompt the pool can never hold, counts it
    as refused once, and opens nothing."""
    store, pool, admission = _admission(num_blocks=8)
    request = admission.open(list(range(29)))
    with pytest.raises(OutOfBlocksError, match="can never fit"):
        admission.gate([_item(pool, request, max_tokens=1)])
    assert admission.counts["refused"] == 1 and admission.counts["admitted"] == 0
    assert request.seqs is None and pool.held_blocks() == 0


def test_the_feed_moves_when_more_was_published_before_admission():
    """Rule: queued expecting no hit, opened after its first 8 tokens were published: mlx-lm's
    item then feeds from token 8 and believes those 8 are cached."""
    store, pool, admission = _admission()
    request = admission.open(A[:10])
    item = _item(pool, request, max_tokens=4)
    assert item[1] == [A[:9], A[9:10]] and item[4] == []
    _publish(store, A[:8])
    assert admission.gate([item]) == ([item], [])
    assert request.cached_tokens == 8
    assert item[1] == [A[8:9], A[9:10]] and item[4] == A[:8]


def test_sequences_on_other_caches_pass_straight_through():
    """Rule: an item whose caches are mlx-lm's own (no paged request) is admitted untouched and
    does not stop paged requests behind it."""
    store, pool, admission = _admission()
    plain = [0, [[1, 2], [3]], 5, [KVCache(), None], []]
    request = admission.open(A[:10])
    paged = _item(pool, request, max_tokens=4, uid=1)
    assert admission.gate([plain, paged]) == ([plain, paged], [])
    assert admission.counts["admitted"] == 1


def test_only_admitted_requests_are_leaders():
    """Rule: a running request that admission did not admit (opened directly) is no leader, so
    a queued request sharing its unpublished prompt is admitted, not held back."""
    store, pool, admission = _admission()
    other, caches = _running(pool, A[:8] + [1])
    assert not other.admitted and not other.committed
    request = admission.open(A[:8] + [2, 3])
    item = _item(pool, request, max_tokens=4)
    assert admission.gate([item]) == ([item], [])
    assert admission.counts["waited_for_prefix"] == 0
    del caches


def test_a_request_admitted_earlier_in_the_same_gate_is_a_leader():
    """Rule: two queued requests sharing a prompt block arrive together: the first is admitted,
    the second waits for it to publish."""
    store, pool, admission = _admission()
    first = admission.open(A[:8] + [1])
    second = admission.open(A[:8] + [2, 3])
    items = [_item(pool, first, 4, uid=0), _item(pool, second, 4, uid=1)]
    assert admission.gate(items) == (items[:1], items[1:])
    assert admission.counts["waited_for_prefix"] == 1 and second.seqs is None


def test_a_request_admitted_by_an_earlier_gate_and_not_yet_published_is_a_leader():
    """Rule: a running admitted request whose prompt is not yet published holds back a queued
    request sharing a block of it, in later gate calls too."""
    store, pool, admission = _admission()
    first = admission.open(A[:8] + [1])
    assert admission.gate([_item(pool, first, 4)])[0]
    assert first.admitted and not first.committed
    second = admission.open(A[:8] + [2, 3])
    item = _item(pool, second, 4, uid=1)
    assert admission.gate([item]) == ([], [item])
    assert admission.counts["waited_for_prefix"] == 1 and second.seqs is None


def test_a_request_that_cannot_be_opened_waits_holding_nothing():
    """Rule: when the promise fits but the prompt's blocks cannot be opened (its hit blocks were
    counted as evictable), the request waits, unopened and uncounted, and is admitted later."""
    store, pool, admission = _admission(num_blocks=16)
    _publish(store, A[:8])  # 2 cached blocks, evictable
    other, caches = _running(pool, list(range(56)))  # 14 blocks: only the 2 cached are left
    request = admission.open(A[:10])  # expects 8 cached: promise 3 + 1 - 2 = 2 blocks
    assert request.cached_tokens == 8
    item = _item(pool, request, max_tokens=1)
    assert admission.gate([item]) == ([], [item])
    assert request.seqs is None and not request.admitted and request.cached_tokens == 8
    assert admission.counts["admitted"] == 0 and pool.held_blocks() == 14
    store.check_invariants()
    other.close()
    assert admission.gate([item]) == ([item], [])
    assert request.admitted and admission.counts["admitted"] == 1
    del caches


def test_a_request_whose_promise_fails_once_opened_is_queued_again():
    """Rule: once opened, its hit blocks pinned, the promise is checked again; if it no longer
    holds, the request is closed and queued again expecting the same hit (not admitted)."""
    store, pool, admission = _admission(num_blocks=16)
    _publish(store, A[:8])
    other, caches = _running(pool, list(range(48)))  # 12 blocks held: 4 available (2 cached)
    request = admission.open(A[:10])
    item = _item(pool, request, max_tokens=10)  # 20 positions: 5 + 1 - 2 = 4 expected
    assert admission.gate([item]) == ([], [item])  # opened, it holds 3 and needs 3 of 1 left
    assert request.seqs is None and not request.admitted and request.cached_tokens == 8
    assert admission.counts["admitted"] == 0 and pool.held_blocks() == 12
    assert store.cache.prefix_match(A[:10]) == 8  # its hit blocks are cached again
    store.check_invariants()
    other.close()
    assert admission.gate([item]) == ([item], [])
    assert request.admitted and admission.counts["admitted"] == 1
    del caches


# ---- _refeed: moving mlx-lm's feed to the prefix actually cached ------------------------------


def test_tokens_evicted_meanwhile_are_put_back_in_front():
    """Rule: fewer tokens cached than expected (8 -> 4): prompt[4:8] goes back in front of the
    first segment; the last segment is untouched; all_tokens becomes the new cached prefix."""
    item = [0, [A[8:11], A[11:]], 5, None, A[:8]]
    _refeed(item, A, expected=8, cached=4)
    assert item[1] == [A[4:11], A[11:]]
    assert item[4] == A[:4]
    assert item[:1] + item[2:4] == [0, 5, None]


def test_all_tokens_of_another_length_are_left_alone():
    """Rule: all_tokens is rewritten only when it is the expected cached prefix (mlx-lm's own
    history of that length); anything else (none given) stays as it was."""
    item = [0, [A[8:11], A[11:]], 5, None, []]
    _refeed(item, A, expected=8, cached=4)
    assert item[1] == [A[4:11], A[11:]] and item[4] == []
    item = [0, [A[4:8], A[8:11], A[11:]], 5, None, []]
    _refeed(item, A, expected=4, cached=8)
    assert item[1] == [A[8:11], A[11:]] and item[4] == []


def test_tokens_published_meanwhile_are_dropped_from_the_front_and_empty_segments_go():
    """Rule: more tokens cached than expected (4 -> 8): the first 4 fed tokens are dropped; a
    segment emptied by it is removed, never left empty."""
    item = [0, [A[4:8], A[8:11], A[11:]], 5, None, A[:4]]
    with _within(5):
        _refeed(item, A, expected=4, cached=8)
    assert item[1] == [A[8:11], A[11:]]
    assert item[4] == A[:8]


def test_a_drop_longer_than_the_first_segment_continues_into_the_next():
    """Rule: the drop spans segments: a 1-token first segment goes, and the other 3 tokens come
    off the front of the next one."""
    item = [0, [A[4:5], A[5:11], A[11:]], 5, None, A[:4]]
    with _within(5):
        _refeed(item, A, expected=4, cached=8)
    assert item[1] == [A[8:11], A[11:]]
    assert item[4] == A[:8]


# ---- _request_of ----------------------------------------------------------------------------


def test_the_request_of_an_items_caches():
    """Rule: an item's request is the first session of its first paged batch cache, and only a
    RequestPool request counts: mlx-lm's caches, none, or a plain store session give None."""
    store, pool, admission = _admission()
    request = pool.queue(A[:6])
    assert _request_of([None, *pool.caches([request])]) is request
    assert _request_of(None) is None
    assert _request_of([KVCache(), None]) is None
    session = store.open(A[:6])
    assert _request_of(session.caches) is None
    session.close()


# ---- AdmittingBatchGenerator ----------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from tests.parity.models import tiny_model

    return tiny_model("llama")


def test_admission_may_be_given_as_a_callable_or_none(model):
    """Rule: `admission` is the Admission given, or what a callable returns (called each time),
    or None."""
    _, _, admission = _admission()
    calls = []
    given = AdmittingBatchGenerator(model, admission=admission)
    later = AdmittingBatchGenerator(model, admission=lambda: calls.append(1) or admission)
    none = AdmittingBatchGenerator(model, admission=None)
    assert given.admission is admission
    assert later.admission is admission and later.admission is admission and len(calls) == 2
    assert none.admission is None
    for gen in (given, later, none):
        gen.close()


def test_remove_counts_the_cancelled_and_returns_no_caches_unless_asked(model):
    """Rule: `remove` counts each removed request it knows as cancelled (unknown uids not), and,
    like mlx-lm's, hands back no caches unless asked (held caches would keep blocks)."""
    _, _, admission = _admission()
    gen = AdmittingBatchGenerator(model, admission=admission, max_tokens=2)
    uids = gen.insert([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [2, 2, 2])
    assert gen.remove([uids[0], 12345]) == {}
    assert admission.counts["cancelled"] == 1
    assert set(gen.remove([uids[1]], return_prompt_caches=True)) == {uids[1]}
    assert admission.counts["cancelled"] == 2
    gen.close()
    bare = AdmittingBatchGenerator(model, admission=None, max_tokens=2)
    (uid,) = bare.insert([[1, 2, 3]], [2])
    assert bare.remove([uid]) == {}
    bare.close()


def test_without_admission_the_generator_is_mlx_lms(model):
    """Rule: with no Admission (None, or a callable returning None) the gate is skipped and
    requests run as in mlx-lm's BatchGenerator."""
    for admission in (None, lambda: None):
        gen = AdmittingBatchGenerator(model, admission=admission, max_tokens=2)
        (uid,) = gen.insert([[1, 2, 3]], [2])
        tokens = []
        for _ in range(6):
            _, responses = gen.next()
            tokens += [r.token for r in responses if r.uid == uid]
        assert len(tokens) == 2
        gen.close()
