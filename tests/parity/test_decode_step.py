"""The decode step (pagedkv/mlx_lm/step.py): a step's first layer per group takes the checked path
and records the step; later layers reuse it. Whatever happens between layers (another session's
operation, a trim, bad input, other dtypes, other threads), every layer's K/V lands exactly where
the backend's own write would put it, and a refused call changes nothing."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

from pagedkv import Config
from pagedkv.errors import InvalidArgumentError, KVShapeError
from pagedkv.mlx_lm import store as store_module
from pagedkv.mlx_lm.store import PagedKVStore

LAYERS, HEADS, DIM = 3, 2, 4


def make_store(num_blocks: int = 32, block_size: int = 4) -> PagedKVStore:
    config = Config(
        num_blocks=num_blocks, block_size=block_size, num_layers=LAYERS, num_kv_heads=HEADS,
        head_dim=DIM,
    )  # fmt: skip
    return PagedKVStore(config)


def rows(batch: int, count: int, seed: int, dtype=mx.float32) -> mx.array:
    """Distinct K/V rows `[B, heads, count, dim]` (mlx-lm's layout)."""
    rng = np.random.default_rng(seed)
    return mx.array(rng.normal(size=(batch, HEADS, count, DIM)).astype(np.float32)).astype(dtype)


class Recorder:
    """What each sequence should hold: per layer, the rows written so far (float32)."""

    def __init__(self) -> None:
        self.kv: dict[tuple[int, int], list[np.ndarray]] = {}

    def add(self, seq: int, layer: int, keys: mx.array, values: mx.array) -> None:
        # [heads, L, dim] -> [L, heads, dim], as stored
        as_stored = [np.array(a.astype(mx.float32)).transpose(1, 0, 2) for a in (keys, values)]
        self.kv.setdefault((seq, layer), []).append(as_stored)

    def check(self, store: PagedKVStore, seq: int) -> None:
        for layer in range(LAYERS):
            want_k, want_v = (np.concatenate(part) for part in zip(*self.kv[(seq, layer)]))
            keys, values = store.cache.gather(seq, layer)
            np.testing.assert_array_equal(np.array(keys.astype(mx.float32)), want_k)
            np.testing.assert_array_equal(np.array(values.astype(mx.float32)), want_v)


def step(caches, recorder: Recorder, sessions, seed: int, layers=range(LAYERS), dtype=mx.float32):
    """One decode token per session through the given layers; returns each layer's fetch."""
    fetched = []
    for layer in layers:
        new = rows(len(sessions), 1, seed * 100 + layer, dtype)
        fetched.append(caches[layer].update_and_fetch(new, new + 1))
        for b, session in enumerate(sessions):
            recorder.add(session.seq, layer, new[b], (new + 1)[b])
    return fetched


def evaluate_pools(store: PagedKVStore) -> None:
    """Every pool, read under the cache's lock as the library reads them: never in the middle of
    another thread's write (its lazy result only that thread can evaluate)."""
    with store.cache._lock:
        pools = [*store.cache.storage.keys, *store.cache.storage.values]
    mx.eval(pools)


def open_and_prefill(store: PagedKVStore, recorder: Recorder, prompt: list[int], seed: int):
    session = store.open(prompt)
    for layer, cache in enumerate(session.caches):
        new = rows(1, len(session.remaining_prompt), seed + layer)
        cache.update_and_fetch(new, new + 1)
        recorder.add(session.seq, layer, new[0], new[0] + 1)
    return session


def count_backend_writes(monkeypatch, store: PagedKVStore) -> list[str]:
    calls: list[str] = []
    cache = store.cache
    for name in ("write_kv", "write_kv_batch"):
        original = getattr(cache, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cache, name, counted)
    return calls


@pytest.mark.parametrize("batch", [1, 3])
def test_later_layers_of_a_step_reuse_it_and_write_exactly(monkeypatch, batch):
    store, recorder = make_store(), Recorder()
    sessions = [open_and_prefill(store, recorder, [7, 8, 9 + b], seed=10 * b) for b in range(batch)]
    caches = store.batch(sessions) if batch > 1 else sessions[0].caches
    calls = count_backend_writes(monkeypatch, store)
    for n in range(6):  # crosses block boundaries (block size 4)
        fetched = step(caches, recorder, sessions, seed=n)
        mx.eval(fetched)
    assert len(calls) == 6  # one checked write per step (its first layer), the rest reuse it
    for session in sessions:
        recorder.check(store, session.seq)
        assert session.offsets == [store.cache.sequence_length(session.seq)] * LAYERS
    # the fetch of the last layer is the whole history, as the backend gathers it
    keys, _ = fetched[-1]
    want, _ = store.cache.gather(sessions[-1].seq, LAYERS - 1)
    got = keys[-1, :, : want.shape[0]].transpose(1, 0, 2)
    np.testing.assert_array_equal(np.array(got), np.array(want))
    store.check_invariants()


def test_a_batch_offset_is_each_sessions_own_and_shared_by_a_steps_layers():
    """`offset` of a batched layer (what mlx-lm's rope reads): every session's own offset for that
    layer, as one array that the layers of a step share, and a new one once any offset moves."""
    store, recorder = make_store(), Recorder()
    prompts = ([1, 2, 3], [4, 5, 6, 7, 8])
    sessions = [open_and_prefill(store, recorder, p, seed=3 * i) for i, p in enumerate(prompts)]
    caches = store.batch(sessions)
    first = caches[0].offset
    assert first.tolist() == [3, 5] and caches[1].offset is first  # one array for the step
    other = store.batch(sessions[::-1])  # the same offsets in the other order: their own array
    assert other[0].offset.tolist() == [5, 3]
    step(caches, recorder, sessions, seed=1, layers=[0])  # layer 0 moves on, layer 1 not yet
    assert caches[0].offset.tolist() == [4, 6] and caches[1].offset.tolist() == [3, 5]
    step(caches, recorder, sessions, seed=1, layers=[1, 2])
    assert [c.offset.tolist() for c in caches] == [[4, 6]] * LAYERS
    caches[2].trim(2)
    assert caches[2].offset.tolist() == [2, 4] and caches[0].offset.tolist() == [4, 6]


def test_an_operation_between_layers_makes_the_next_layer_take_the_checked_path(monkeypatch):
    """Another session opened in the middle of a step ticks the clock: the step is stale."""
    store, recorder = make_store(), Recorder()
    session = open_and_prefill(store, recorder, [1, 2, 3], seed=0)
    calls = count_backend_writes(monkeypatch, store)
    step(session.caches, recorder, [session], seed=1, layers=[0])
    other = open_and_prefill(store, recorder, [4, 5, 6, 7, 8], seed=50)  # writes, ticks
    calls.clear()
    step(session.caches, recorder, [session], seed=1, layers=[1, 2])
    assert calls == ["write_kv"]  # layer 1 re-checked (stale step), layer 2 reused the new one
    evaluate_pools(store)
    recorder.check(store, session.seq)
    recorder.check(store, other.seq)


def test_bad_input_on_a_later_layer_is_refused_and_changes_nothing():
    store, recorder = make_store(), Recorder()
    session = open_and_prefill(store, recorder, [1, 2, 3], seed=0)
    step(session.caches, recorder, [session], seed=1, layers=[0])
    before = list(session.offsets)
    wrong = mx.zeros((1, HEADS, 1, DIM + 1))
    with pytest.raises(KVShapeError):
        session.caches[1].update_and_fetch(wrong, wrong)
    assert session.offsets == before
    step(session.caches, recorder, [session], seed=1, layers=[1, 2])
    recorder.check(store, session.seq)


def test_rows_of_another_dtype_take_the_checked_path_and_are_cast():
    store, recorder = make_store(), Recorder()
    session = open_and_prefill(store, recorder, [1, 2, 3], seed=0)
    for n in range(3):
        step(session.caches, recorder, [session], seed=n, dtype=mx.float16)
    recorder.check(store, session.seq)  # float16 rows are exact in the float32 pool


def test_a_thread_coming_while_the_owner_is_mid_step_waits_for_its_writes():
    """The owner writes a step's later layers lazily; a newcomer must not evaluate them before
    the owner schedules them (MLX cannot evaluate another thread's work), so it waits."""
    store, recorder = make_store(), Recorder()
    half_done, newcomer_waiting, results = threading.Event(), threading.Event(), {}

    def owner() -> None:
        try:
            with mx.stream(mx.new_stream(mx.default_device())):
                session = open_and_prefill(store, recorder, [1, 2, 3], seed=0)
                step(session.caches, recorder, [session], seed=1, layers=[0, 1])  # 1 is lazy
                results["pending"] = dict(store.pending), store.shared
                half_done.set()
                newcomer_waiting.wait(timeout=30)
                while not store.shared:  # the newcomer has made the store shared and waits
                    threading.Event().wait(0.001)
                step(session.caches, recorder, [session], seed=1, layers=[2])  # schedules 1, 2
                evaluate_pools(store)
                results["owner"] = session
        except BaseException as error:  # noqa: BLE001 - compared below
            results["owner"] = error
            half_done.set()

    def newcomer() -> None:
        half_done.wait(timeout=30)
        newcomer_waiting.set()
        with mx.stream(mx.new_stream(mx.default_device())):
            try:
                session = open_and_prefill(store, recorder, [4, 5, 6, 7, 8], seed=9)
                evaluate_pools(store)
                results["newcomer"] = session
            except BaseException as error:  # noqa: BLE001 - compared below
                results["newcomer"] = error

    threads = [threading.Thread(target=f, daemon=True) for f in (owner, newcomer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert results["pending"] == ({0: [1]}, False)  # the owner's layer 1 waited, unscheduled
    assert not isinstance(results["owner"], BaseException), results["owner"]
    assert not isinstance(results["newcomer"], BaseException), results["newcomer"]
    assert store.shared and not store.pending
    recorder.check(store, results["owner"].seq)
    recorder.check(store, results["newcomer"].seq)


def test_a_whole_step_leaves_nothing_unscheduled_so_a_newcomer_goes_straight_on():
    store, recorder = make_store(), Recorder()
    done = {}

    def owner() -> None:
        with mx.stream(mx.new_stream(mx.default_device())):
            session = open_and_prefill(store, recorder, [1, 2, 3], seed=0)
            step(session.caches, recorder, [session], seed=1)  # never evaluated by the owner
            done["owner"] = session

    thread = threading.Thread(target=owner, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not store.pending  # the step's last layer scheduled the whole step
    with mx.stream(mx.new_stream(mx.default_device())):
        session = open_and_prefill(store, recorder, [4, 5, 6, 7, 8], seed=9)
        step(session.caches, recorder, [session], seed=2)
        evaluate_pools(store)
    assert store.shared and not store.pending
    recorder.check(store, done["owner"].seq)
    recorder.check(store, session.seq)


def test_a_step_left_half_way_makes_a_newcomer_wait_then_refuse_until_the_owner_returns(
    monkeypatch,
):
    monkeypatch.setattr(store_module, "STEP_WAIT_S", 0.05)
    store, recorder = make_store(), Recorder()
    half_done, retry, finished = threading.Event(), threading.Event(), threading.Event()
    done = {}

    def owner() -> None:
        with mx.stream(mx.new_stream(mx.default_device())):
            session = open_and_prefill(store, recorder, [1, 2, 3], seed=0)
            step(session.caches, recorder, [session], seed=1, layers=[0, 1])  # then "fails"
            done["owner"] = session
            half_done.set()
            retry.wait(timeout=30)
            session.close()  # the owner's next operation schedules what it left
            finished.set()

    thread = threading.Thread(target=owner, daemon=True)
    thread.start()
    half_done.wait(timeout=30)
    sequences = store.cache.stats().sequences
    with mx.stream(mx.new_stream(mx.default_device())):
        with pytest.raises(InvalidArgumentError, match="half-way"):
            store.open([4, 5, 6, 7, 8])
        assert store.cache.stats().sequences == sequences  # nothing changed
        retry.set()
        finished.wait(timeout=30)
        session = open_and_prefill(store, recorder, [4, 5, 6, 7, 8], seed=9)
        evaluate_pools(store)
    thread.join(timeout=60)
    assert not store.pending
    recorder.check(store, session.seq)


def test_a_prompts_last_token_fed_alone_publishes_the_prompt_at_its_last_layer(monkeypatch):
    """A prompt prefilled in chunks may end with a one-token chunk, which has a decode step's
    shape. Its later layers must still take the checked path, whose last layer publishes the
    prompt (rule: a prompt is shared once every layer holds it): the next request with that
    prompt reuses its full blocks."""
    store, recorder = make_store(), Recorder()
    prompt = list(range(20, 29))  # 9 tokens: two full blocks of 4, and one more
    session = store.open(prompt)
    calls = count_backend_writes(monkeypatch, store)
    for layer, cache in enumerate(session.caches):  # all but the last token
        new = rows(1, len(prompt) - 1, layer)
        cache.update_and_fetch(new, new + 1)
    assert not session.committed
    step(session.caches, recorder, [session], seed=5)  # the last prompt token, alone
    assert len(calls) == 2 * LAYERS  # the one-token chunk took the checked path at every layer
    assert session.committed
    again = store.open(prompt)
    assert len(again.remaining_prompt) == 1  # both full blocks came from the first request


@pytest.mark.parametrize("batch", [1, 2])
def test_a_decode_step_changes_exactly_one_row_per_session_pool_and_layer(batch):
    """The later layers' one-update writes touch their session's new slot and nothing else: not
    the next row (a position not yet written), not the next block (another sequence's)."""
    store, recorder = make_store(), Recorder()
    sessions = [open_and_prefill(store, recorder, [1, 2 + b], seed=b) for b in range(batch)]
    neighbour = open_and_prefill(store, recorder, [5, 6, 7, 8], seed=7)  # the next block id
    caches = store.batch(sessions) if batch > 1 else sessions[0].caches
    storage = store.cache.storage

    def pools():
        with store.cache._lock:
            return [np.array(p) for p in (*storage.keys, *storage.values)]

    before = pools()
    step(caches, recorder, sessions, seed=3)
    slots = {
        (int(store.cache.block_table_array(s.seq)[2 // 4]), 2 % 4) for s in sessions
    }  # position 2 of each session
    for pool_before, pool_after in zip(before, pools()):
        changed = np.argwhere((pool_before != pool_after).any(axis=(2, 3)))  # [blocks, rows]
        assert {(int(b), int(r)) for b, r in changed} == slots
    for session in (*sessions, neighbour):
        recorder.check(store, session.seq)
