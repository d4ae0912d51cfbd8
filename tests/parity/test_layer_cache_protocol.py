"""Details of mlx-lm's cache protocol that a paged layer cache must match: the attention mask it
makes (value, shape, and the "causal" / None shortcuts mlx-lm's own KVCache takes), its bytes,
and a batched decode step that cannot get its blocks changing nothing."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from pagedkv import Config
from pagedkv.errors import InvalidArgumentError, OutOfBlocksError
from pagedkv.mlx_lm import PagedKVStore

LAYERS, HEADS, DIM, BLOCK = 2, 2, 4, 4


def make_store(num_blocks: int = 32) -> PagedKVStore:
    return PagedKVStore(
        Config(num_blocks=num_blocks, block_size=BLOCK, num_layers=LAYERS, num_kv_heads=HEADS,
               head_dim=DIM)
    )  # fmt: skip


def kv(batch: int, count: int, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array(rng.normal(size=(batch, HEADS, count, DIM)).astype(np.float32))


def prefill(session, count: int, seed: int = 0) -> None:
    for layer, cache in enumerate(session.caches):
        rows = kv(1, count, seed + layer)
        cache.update_and_fetch(rows, rows)


@pytest.mark.parametrize("offset", [0, 4, 7])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("return_array", [False, True])
@pytest.mark.parametrize("window_size", [None, 2, 5])
def test_one_sessions_mask_is_mlx_lms(offset, n, return_array, window_size):
    store = make_store()
    session = store.open(list(range(1, offset + 2)))
    if offset:
        prefill(session, offset)
    reference = KVCache()
    if offset:
        reference.update_and_fetch(kv(1, offset, 0), kv(1, offset, 0))
    got = session.caches[0].make_mask(n, return_array=return_array, window_size=window_size)
    want = reference.make_mask(n, return_array=return_array, window_size=window_size)
    if want is None or isinstance(want, str):
        assert got == want
    else:
        assert isinstance(got, mx.array) and got.shape == want.shape
        assert mx.array_equal(got, want)


def test_nbytes_counts_the_sessions_blocks_of_one_layer_once():
    store = make_store()
    first = store.open(list(range(1, 10)))  # 9 tokens: 3 blocks
    prefill(first, 9)
    per_block = 2 * BLOCK * HEADS * DIM * 4  # K and V, float32
    assert first.caches[0].nbytes == 3 * per_block
    assert first.caches[1].nbytes == 3 * per_block  # per layer, not the whole block
    second = store.open(list(range(1, 10)))  # shares the two full blocks
    batch = store.batch([first, second])
    assert batch[0].nbytes == 4 * per_block  # 3 + its own last block


def test_a_batched_decode_step_out_of_blocks_changes_nothing():
    """Two sessions each need a new block at the next position and the pool has one: the
    batch's step is refused whole (not the first session extended, the second refused)."""
    store = make_store(num_blocks=3)
    sessions = [store.open([1, 2, 3, 4 + s]) for s in range(2)]  # 4 tokens: one full block each
    for session in sessions:
        prefill(session, 4, seed=10)
    caches = store.batch(sessions)
    stats = store.cache.stats()
    assert stats.free_blocks + stats.cached_blocks == 1
    before = (store.cache.snapshot(), [list(s.offsets) for s in sessions])
    with pytest.raises(OutOfBlocksError):
        caches[0].update_and_fetch(kv(2, 1, 20), kv(2, 1, 21))
    assert (store.cache.snapshot(), [list(s.offsets) for s in sessions]) == before


def test_each_chunk_fetches_the_whole_history_as_mlx_lms_cache_does():
    """Chunks of 1, 2, 3 and 1 positions (a chunk of one is a decode step's shape): after each,
    update_and_fetch returns every position so far, equal to mlx-lm's KVCache's."""
    store = make_store()
    session = store.open(list(range(1, 8)))
    reference = [KVCache() for _ in range(LAYERS)]
    assert all(c.empty() for c in session.caches) and reference[0].empty()
    seen = 0
    for n, count in enumerate((1, 2, 3, 1)):
        for layer, cache in enumerate(session.caches):
            rows = kv(1, count, 10 * n + layer)
            got = cache.update_and_fetch(rows, rows + 1)
            want = reference[layer].update_and_fetch(rows, rows + 1)
            for a, b in zip(got, want):
                assert a.shape == b.shape == (1, HEADS, seen + count, DIM)
                assert mx.array_equal(a, b)
        seen += count
        assert not any(c.empty() for c in session.caches)


def window_store() -> PagedKVStore:
    return PagedKVStore(
        Config(num_blocks=32, block_size=BLOCK, num_layers=LAYERS, num_kv_heads=HEADS,
               head_dim=DIM, window=6)
    )  # fmt: skip


def test_trimming_a_window_session_back_past_its_released_keys_is_refused_unchanged():
    """Window 6, block size 4, 14 positions: the blocks of positions 0..7 are released. Trimmed
    back to L positions, the next query (at L) needs keys from L - 5 on, so the trim is refused
    below 8 + 6 = 14 positions (the longest layer counts), with nothing changed."""
    store = window_store()
    session = store.open(list(range(1, 11)))
    prefill(session, 10)
    for step in range(4):  # decode to 14 positions: the window moves past blocks 0 and 1
        for layer, cache in enumerate(session.caches):
            rows = kv(1, 1, 100 + 10 * step + layer)
            cache.update_and_fetch(rows, rows)
    assert store.cache.block_table_array(session.seq).tolist()[:2] == [-1, -1]
    session.caches[0].trim(1)  # the other layer still holds 14: the stored length stays 14
    before = (store.cache.snapshot(), list(session.offsets))
    with pytest.raises(InvalidArgumentError, match="trim to at least 14 positions"):
        session.caches[1].trim(1)  # every layer at 13 now: refused
    assert (store.cache.snapshot(), list(session.offsets)) == before


@pytest.mark.parametrize("offset", [0, 3, 9])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("window_size", [None, 3, 10])
def test_a_window_layers_mask_shows_the_last_positions_of_the_narrower_window(
    offset, n, window_size
):
    """Query position q sees keys q - w < k <= q, w = min(the layer's window, the model's
    window_size): mlx-lm's RotatingKVCache's view, in the pool's position order."""
    store = window_store()
    session = store.open(list(range(1, offset + 2)))
    if offset:
        prefill(session, offset)
    mask = session.caches[0].make_mask(n, return_array=True, window_size=window_size)
    look_back = min(6, window_size or 6)
    queries = np.arange(offset, offset + n)[:, None]
    keys = np.arange(offset + n)[None, :]
    want = (keys <= queries) & (keys > queries - look_back)
    if mask is None:  # one query whose whole history is visible
        assert n == 1 and want.all()
    else:
        assert np.array_equal(np.array(mask).reshape(want.shape), want)
