"""Every stats counter, pinned: a readable scenario with the exact Stats after every operation that
moves one (add, commit, fork, copy-on-write, duplicate, trim, free, eviction under pressure, evict,
clear), on the spec and the backend. Each step states only what changed."""

from dataclasses import replace

import pytest

from pagedkv import Config
from pagedkv.types import Stats
from tests.impls import HAVE_MLX, IMPLS, cache_class

ZERO = Stats(
    free_blocks=6,
    cached_blocks=0,
    in_use_blocks=0,
    shared_blocks=0,
    indexed_blocks=0,
    sequences=0,
    tokens_stored=0,
    unique_tokens=0,
    prefix_queries=0,
    prompt_tokens=0,
    prefix_hit_tokens=0,
    prefill_tokens_avoided=0,
    cow_copies=0,
    evictions=0,
    duplicates=0,
)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_counter_moves_exactly_as_the_rules_say(impl):
    cache = cache_class(impl)(Config(num_blocks=6, block_size=2, store_kv=False))
    want = ZERO
    assert cache.stats() == want

    def expect(**changes):
        nonlocal want
        want = replace(want, **changes)
        assert cache.stats() == want

    a, hit = cache.add_sequence([1, 2, 3, 4, 5])  # blocks 0, 1, 2
    assert hit == 0
    expect(
        free_blocks=3,
        in_use_blocks=3,
        sequences=1,
        tokens_stored=5,
        unique_tokens=5,
        prefix_queries=1,
        prompt_tokens=5,
    )
    assert cache.commit(a) == 2
    expect(indexed_blocks=2)

    b, hit = cache.add_sequence([1, 2, 3, 4, 9])  # shares 0, 1; block 3 for the tail
    assert hit == 4 and cache.block_table(b) == (0, 1, 3)
    expect(
        free_blocks=2,
        in_use_blocks=4,
        shared_blocks=2,
        sequences=2,
        tokens_stored=10,
        unique_tokens=6,
        prefix_queries=2,
        prompt_tokens=10,
        prefix_hit_tokens=4,
        prefill_tokens_avoided=4,
    )

    c = cache.fork(b)  # shares 0, 1 and the partial tail 3
    expect(shared_blocks=3, sequences=3, tokens_stored=15, prefill_tokens_avoided=9)

    cache.extend(c, [7])  # tail 3 is shared: copied into block 4
    assert cache.block_table(c) == (0, 1, 4)
    expect(
        free_blocks=1,
        in_use_blocks=5,
        shared_blocks=2,
        tokens_stored=16,
        unique_tokens=8,
        cow_copies=1,
    )
    assert cache.commit(c) == 1  # (9, 7) in block 4
    expect(indexed_blocks=3)

    g, hit = cache.add_sequence([1, 2])  # no match may cover the last token: private block 5
    assert hit == 0 and cache.block_table(g) == (5,)
    expect(
        free_blocks=0,
        in_use_blocks=6,
        sequences=4,
        tokens_stored=18,
        unique_tokens=10,
        prefix_queries=3,
        prompt_tokens=12,
    )
    assert cache.commit(g) == 0  # (1, 2) is indexed as block 0 already: rule 4
    expect(duplicates=1)
    cache.free(g)
    expect(free_blocks=1, in_use_blocks=5, sequences=3, tokens_stored=16, unique_tokens=8)

    cache.trim(c, 3)  # back to 3 tokens: releases block 4, which stays cached
    assert cache.block_table(c) == (0, 1)
    expect(cached_blocks=1, in_use_blocks=4, tokens_stored=13, unique_tokens=6)
    cache.free(a)  # block 2 is freed; 0 and 1 are still read by b and c
    expect(free_blocks=2, in_use_blocks=3, sequences=2, tokens_stored=8, unique_tokens=5)

    h, hit = cache.add_sequence([8] * 5)  # 3 blocks: the free queue (5, 2), then evict 4
    assert cache.block_table(h) == (5, 2, 4)
    expect(
        free_blocks=0,
        cached_blocks=0,
        in_use_blocks=6,
        indexed_blocks=2,
        sequences=3,
        tokens_stored=13,
        unique_tokens=10,
        prefix_queries=4,
        prompt_tokens=17,
        evictions=1,
    )
    cache.free(h)
    expect(free_blocks=3, in_use_blocks=3, sequences=2, tokens_stored=8, unique_tokens=5)

    cache.free(b)
    cache.free(c)
    expect(
        free_blocks=4,
        cached_blocks=2,
        in_use_blocks=0,
        shared_blocks=0,
        sequences=0,
        tokens_stored=0,
        unique_tokens=0,
    )
    assert cache.evict(1) == [1]  # the only leaf; block 0 becomes one
    expect(free_blocks=5, cached_blocks=1, indexed_blocks=1, evictions=2)
    assert cache.clear_cache() == 1
    expect(free_blocks=6, cached_blocks=0, indexed_blocks=0, evictions=3)
    cache.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_duplicate_is_counted_once_even_when_a_later_commit_rewalks_the_path(impl):
    cache = cache_class(impl)(Config(num_blocks=6, block_size=2, store_kv=False))
    a, _ = cache.add_sequence([1, 2, 3])
    cache.commit(a)  # (1, 2) indexed as block 0
    g, _ = cache.add_sequence([1, 2])  # its own private (1, 2)
    assert cache.commit(g) == 0 and cache.stats().duplicates == 1
    c, _ = cache.add_sequence([5, 6, 7])
    cache.commit(c)
    cache.free(c)
    assert cache.evict(1) == [3]  # (5, 6): an index node goes away
    cache.extend(g, [3, 4])
    assert cache.commit(g) == 1  # (3, 4) published under (1, 2); the duplicate is not recounted
    assert cache.stats().duplicates == 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "corrupt",
    [
        lambda c: c.pool.refcounts.__setitem__(0, c.pool.refcounts[0] + 1),
        lambda c: c.pool.free_queue.append(c.pool.free_queue[0]),
        lambda c: c.pool.free_queue.popleft(),
    ],
    ids=["refcount", "free queue duplicate", "free queue lost block"],
)
def test_check_invariants_catches_a_corrupted_state(impl, corrupt):
    from pagedkv.errors import InvariantError

    cache = cache_class(impl)(Config(num_blocks=6, block_size=2, store_kv=False))
    seq, _ = cache.add_sequence([1, 2, 3])
    cache.commit(seq)
    cache.check_invariants()
    corrupt(cache)
    with pytest.raises(InvariantError):
        cache.check_invariants()


@pytest.mark.skipif("mlx" not in IMPLS or not HAVE_MLX, reason="needs MLX")
def test_backend_invariants_recount_the_reclaimable_blocks():
    from pagedkv.errors import InvariantError

    cache = cache_class("mlx")(Config(num_blocks=6, block_size=2, store_kv=False))
    seq, _ = cache.add_sequence([1, 2, 3, 4, 5])
    cache.commit(seq)
    cache.index.num_blocked -= 1  # one blocked node counted as reclaimable
    with pytest.raises(InvariantError, match="blocked count"):
        cache.check_invariants()
