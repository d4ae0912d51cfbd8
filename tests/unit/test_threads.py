"""Threads: many threads on one cache, K/V storage included. The cache serialises calls with its
lock, and the backend hands MLX work between threads (each thread records on its own stream, as
mlx-lm's generation thread does). Invariants hold, nothing leaks, every sequence reads back exactly
its own K/V, and no raw exception escapes."""

from __future__ import annotations

import contextlib
import random
import threading

import numpy as np
import pytest

from pagedkv import Config
from pagedkv.errors import OutOfBlocksError
from tests.impls import HAVE_MLX, IMPLS, cache_class
from tests.property.model import SpecImpl, mlx_native, prefix_kv

THREADS, ROUNDS = 8, 10
JOIN_TIMEOUT = 120  # seconds: a hang fails the test instead of stalling the suite
STEM = list(range(100, 112))  # three full blocks shared by every thread's prompts


def run_threads(target, args: list) -> None:
    """One daemon thread per argument, all started, then joined; a hang fails the test."""
    threads = [threading.Thread(target=target, args=(a,), daemon=True) for a in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_TIMEOUT)
        assert not thread.is_alive(), "a thread hung (MLX work left unscheduled?)"


def stream_for(impl: str):
    """A stream of this thread's own (mlx-lm's generation thread records on one like it)."""
    if impl == "spec":
        return contextlib.nullcontext()
    import mlx.core as mx

    return mx.stream(mx.new_stream(mx.default_device()))


def native(impl: str, array: np.ndarray, dtype: str):
    return SpecImpl.to_native(array, dtype) if impl == "spec" else mlx_native(array, dtype)


def as_float32(impl: str, array, dtype: str) -> np.ndarray:
    return SpecImpl.to_float32(array, dtype) if impl == "spec" else _mlx_float32(array)


def _mlx_float32(array) -> np.ndarray:
    import mlx.core as mx

    return np.array(array.astype(mx.float32))


class Worker:
    def __init__(self, cache, impl: str, index: int) -> None:
        self.cache, self.impl, self.index = cache, impl, index
        self.rng = random.Random(index)
        self.tokens: dict[int, list[int]] = {}

    def write(self, seq: int, start: int) -> None:
        tokens, cfg = self.tokens[seq], self.cache.config
        for layer in range(cfg.num_layers):
            keys, values = prefix_kv(tuple(tokens), layer, cfg)
            k = native(self.impl, keys[start:], cfg.dtype)
            v = native(self.impl, values[start:], cfg.dtype)
            self.cache.write_kv(seq, layer, start, k, v)

    def verify(self, seq: int) -> None:
        cfg = self.cache.config
        for layer in range(cfg.num_layers):
            want_k, want_v = prefix_kv(tuple(self.tokens[seq]), layer, cfg)
            keys, values = self.cache.gather(seq, layer)
            np.testing.assert_array_equal(as_float32(self.impl, keys, cfg.dtype), want_k)
            np.testing.assert_array_equal(as_float32(self.impl, values, cfg.dtype), want_v)

    def grow(self, seq: int, new: list[int], batched: bool) -> None:
        start = len(self.tokens[seq])
        if batched:
            self.cache.decode_step([seq], new)
        else:
            self.cache.extend(seq, new)
        self.tokens[seq] = self.tokens[seq] + new
        self.write(seq, start)

    def round(self, r: int) -> None:
        rng, cache = self.rng, self.cache
        prompt = STEM[: rng.choice([0, 4, 8, 12])] + [self.index, r, rng.randrange(50)]
        seq, cached = cache.add_sequence(prompt)
        self.tokens[seq] = prompt
        self.write(seq, cached)
        cache.commit(seq)
        child = cache.fork(seq)
        self.tokens[child] = list(prompt)
        self.grow(child, [rng.randrange(50) for _ in range(rng.randint(1, 6))], batched=False)
        self.grow(seq, [rng.randrange(50)], batched=True)
        cache.trim(child, rng.randint(0, len(self.tokens[child])))
        self.tokens[child] = self.tokens[child][: cache.sequence_length(child)]
        for s in (seq, child):
            self.verify(s)

    def run(self) -> None:
        with stream_for(self.impl):
            for r in range(ROUNDS):
                try:
                    self.round(r)
                except OutOfBlocksError:
                    pass  # other threads hold the blocks right now: fine, try the next round
                for seq in list(self.tokens):
                    self.cache.free(seq)
                    del self.tokens[seq]


@pytest.mark.parametrize("impl", IMPLS)
def test_many_threads_share_one_cache(impl):
    cache = cache_class(impl)(
        Config(num_blocks=40, block_size=4, num_layers=2, num_kv_heads=2, head_dim=4)
    )
    workers = [Worker(cache, impl, i) for i in range(THREADS)]
    failures: list[BaseException] = []

    def run(worker: Worker) -> None:
        try:
            worker.run()
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    run_threads(run, workers)
    assert not failures, failures
    cache.check_invariants()
    stats = cache.stats()
    assert stats.sequences == 0 and stats.in_use_blocks == 0
    assert stats.prefix_queries > THREADS  # the threads really ran their rounds
    cache.clear_cache()
    assert cache.stats().free_blocks == cache.config.num_blocks  # no leak
    cache.check_invariants()


@pytest.mark.skipif(not HAVE_MLX, reason="needs MLX and mlx-lm (pagedkv[mlx])")
def test_mlx_lm_generation_on_its_own_threads_shares_one_store():
    """As in mlx-lm's server: the store is made on the main thread, requests generate on others
    (mlx-lm records on a thread-local stream); each gets exactly what dense generation gives."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from pagedkv.mlx_lm import PagedKVStore
    from tests.parity.models import greedy, paged_tokens, prompt_tokens, tiny_model

    model = tiny_model("llama")
    system = prompt_tokens(19, seed=1)
    prompts = [system + prompt_tokens(3 + i, seed=10 + i) for i in range(4)]
    dense = [
        [t for t, _ in generate_step(mx.array(p), model, max_tokens=8, sampler=greedy)]
        for p in prompts
    ]
    store = PagedKVStore.for_model(model, num_blocks=64, block_size=8)
    results: dict[int, object] = {}

    def serve(i: int) -> None:
        try:
            session = store.open(prompts[i])
            results[i] = paged_tokens(session, model, max_tokens=8)
            session.close()
        except BaseException as error:  # noqa: BLE001 - compared below
            results[i] = error

    run_threads(serve, list(range(len(prompts))))
    assert [results[i] for i in range(len(prompts))] == dense
    store.cache.check_invariants()
    assert store.cache.stats().sequences == 0


@pytest.mark.skipif(not HAVE_MLX, reason="needs MLX and mlx-lm (pagedkv[mlx])")
def test_threads_sharing_a_store_of_several_groups_under_pressure_leave_no_block_behind():
    """A sliding-window model keeps two caches (full and window layers); a step checks both before
    changing either, under the store's lock, so threads racing for a small pool only ever see
    OutOfBlocksError, never a session half-extended in one group."""

    from pagedkv.mlx_lm import PagedKVStore
    from tests.parity.models import paged_tokens, prompt_tokens
    from tests.parity.zoo import build

    model = build("gemma3_text")
    store = PagedKVStore.for_model(model, num_blocks=12, block_size=4)
    assert len(store.groups) == 2
    # Drawn here: `prompt_tokens` reseeds MLX's global random key, which threads must not share
    # (a thread's draw leaves the key lazy on that thread's stream).
    prompts = [[prompt_tokens(9 + i, seed=20 + i + r) for r in range(3)] for i in range(4)]
    outcomes: list[object] = []

    def serve(i: int) -> None:
        for r in range(3):
            session = None
            try:
                session = store.open(prompts[i][r])
                outcomes.append(len(paged_tokens(session, model, max_tokens=6)))
            except OutOfBlocksError as error:
                outcomes.append(type(error))
            except BaseException as error:  # noqa: BLE001 - reported below
                outcomes.append(error)
            finally:
                if session is not None:
                    session.close()

    run_threads(serve, list(range(4)))
    unexpected = [o for o in outcomes if not (o == 6 or o is OutOfBlocksError)]
    assert not unexpected, (unexpected, outcomes.count(6), len(outcomes))
    assert 6 in outcomes, outcomes
    for cache in store.groups:
        cache.check_invariants()
        assert cache.stats().sequences == 0 and cache.stats().in_use_blocks == 0


@pytest.mark.skipif(not HAVE_MLX, reason="needs MLX (pagedkv[mlx])")
def test_a_step_never_lands_in_one_group_only_when_threads_race_for_blocks():
    """Six threads step sessions of a two-group store (full and window layers) one token at a
    time, with thread switches forced as often as Python allows. A step that runs out of blocks
    must leave the session at the same length in both groups (the store lock spans the checks of
    every group and the changes)."""
    import sys

    import mlx.core as mx

    from pagedkv.mlx_lm.kinds import FULL, WINDOW
    from pagedkv.mlx_lm.store import Entry, PagedKVStore

    full = Config(num_blocks=64, block_size=2, num_kv_heads=1, head_dim=2)
    window = Config(num_blocks=8, block_size=2, num_kv_heads=1, head_dim=2, window=4)
    store = PagedKVStore([full, window], entries=[Entry(FULL, 0, None, 0), Entry(WINDOW, 0, 4, 1)])
    failures: list[object] = []

    def serve(i: int) -> None:
        for r in range(12):
            session = None
            try:
                session = store.open([i, r, 7])
                rows = mx.ones((1, 1, 3, 2))
                for cache in session.caches:
                    cache.update_and_fetch(rows, rows)
                for _ in range(6):
                    for cache in session.caches:
                        cache.update_and_fetch(rows[:, :, :1], rows[:, :, :1])
            except OutOfBlocksError:
                if session is None:
                    continue  # open refused: nothing to compare
                lengths = {c.sequence_length(s) for c, s in zip(store.groups, session.seqs)}
                if len(lengths) != 1:
                    failures.append(f"groups disagree after a refused step: {lengths}")
            except BaseException as error:  # noqa: BLE001 - reported below
                failures.append(error)
            finally:
                if session is not None:
                    session.close()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        run_threads(serve, list(range(6)))
    finally:
        sys.setswitchinterval(interval)
    assert not failures, failures[:3]
    for cache in store.groups:
        cache.check_invariants()
        assert cache.stats().sequences == 0 and cache.stats().in_use_blocks == 0
