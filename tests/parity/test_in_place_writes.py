"""In-place decode writes (pagedkv/mlx_backend/kernels/write.py, `KVStorage.write_in_place`): on a
CUDA GPU a decode step's later layers write their rows into the pools' own buffers, and every
reader of the step reads through the tables the write returned.

Two kinds of tests (the kernel itself: tests/parity/test_write_kernel.py):
- the setting and the bookkeeping (`settle`, the step's flag), on any device;
- the adapter's in-place path end to end against a store with functional writes: on a CUDA GPU with
  the real kernel; elsewhere (the CPU in CI) with `DeferredWrites`, which lands a write only when
  a reader ordered after it (through the tables it returned) or `settle` comes, so a reader the
  library forgot to order reads stale rows here too. What only the GPU can show (that the
  kernel's rows land, and that MLX really orders the readers) is the CUDA run's.
"""

from __future__ import annotations

import threading
import types

import mlx.core as mx
import numpy as np
import pytest

from pagedkv import Config
from pagedkv.errors import ConfigError, KVShapeError
from pagedkv.mlx_backend.kernels import decode, write
from pagedkv.mlx_backend.storage import KVStorage
from pagedkv.mlx_lm import PagedKVStore
from pagedkv.mlx_lm import step as step_module
from tests.parity.models import prompt_tokens, tiny_model

CUDA = write.in_place_device()
on_cuda = pytest.mark.skipif(
    not CUDA,
    reason="the in-place write kernel is CUDA only (mx.fast.cuda_kernel): the CPU and Metal keep "
    "functional writes; the emulated tests below cover the adapter's part here",
)


def config(**changes) -> Config:
    base = dict(num_blocks=24, block_size=4, num_layers=3, num_kv_heads=2, head_dim=8)
    return Config(**(base | changes))


# -- the setting and the bookkeeping (any device) -------------------------------------------------


def test_the_setting_is_read_when_a_store_is_made_and_an_unknown_value_is_refused(monkeypatch):
    monkeypatch.setenv(write.ENV, "sometimes")
    with pytest.raises(ConfigError, match="PAGEDKV_DECODE_WRITES='sometimes'"):
        PagedKVStore(config())
    monkeypatch.setenv(write.ENV, " Functional ")
    assert PagedKVStore(config()).in_place_writes is False
    monkeypatch.setenv(write.ENV, "auto")
    assert PagedKVStore(config()).in_place_writes is True
    monkeypatch.delenv(write.ENV)
    assert PagedKVStore(config()).in_place_writes is True


def test_a_step_writes_in_place_only_if_the_store_allows_it_and_the_device_has_the_kernel(
    monkeypatch,
):
    table = [np.array([3], np.int32)]
    for store_allows, device_has, expected in [
        (True, True, True), (True, False, False), (False, True, False), (False, False, False),
    ]:  # fmt: skip
        monkeypatch.setattr(step_module, "in_place_device", lambda has=device_has: has)
        step = step_module.DecodeStep.build(0, [0], True, table, [2], 4, store_allows)
        assert step.in_place is expected
    assert write.in_place_device() is (decode.backend() == "cuda")


def test_settle_completes_one_layer_or_all_and_reading_the_pools_settles_them(monkeypatch):
    from pagedkv.mlx_backend import storage as storage_module

    storage = KVStorage(config())
    evaluated = []
    spy = types.SimpleNamespace(eval=lambda *arrays: evaluated.append(arrays))
    monkeypatch.setattr(storage_module, "mx", spy)
    first, second = mx.array([1]) + 1, mx.array([5]) * 2
    storage.unsettled = {0: first, 2: second}
    storage.settle(1)  # nothing pending there: nothing evaluated
    assert set(storage.unsettled) == {0, 2} and evaluated == []
    storage.settle(2)
    assert set(storage.unsettled) == {0} and len(evaluated) == 1
    assert len(evaluated[0][0]) == 1 and evaluated[0][0][0] is second
    assert len(storage.keys) == 3 and storage.unsettled == {}  # the public lists settle all
    assert evaluated[1][0][0] is first
    storage.unsettled = {1: second}
    assert len(storage.values) == 3 and storage.unsettled == {} and evaluated[2][0][0] is second
    storage.settle()
    assert len(evaluated) == 3  # nothing left: no evaluation
    k_pool, v_pool = storage.pools(1)
    assert k_pool is storage.keys[1] and v_pool is storage.values[1]


# -- the adapter's in-place path against functional writes ----------------------------------------


class DeferredWrites:
    """`write.write_rows` without CUDA, as the GPU orders it: a write lands only when something
    ordered after it runs. Here that is a read through the tables it returned (or a later
    write's), or `settle`; a read of the pool by any other means sees it without the write, as a
    GPU read racing the kernel may. So a reader the library forgot to order reads stale rows,
    and the comparison with functional writes fails."""

    def __init__(self) -> None:
        self.queues: dict[int, list] = {}  # id(pool) -> [(returned tables, apply)], K and V alike

    def write_rows(self, k_pool, v_pool, keys, values, slots, tables, after):
        # what the kernel trusts its caller for: rows of the pool's dtype and row shape
        row = (slots.size, *k_pool.shape[2:])
        assert keys.dtype == values.dtype == k_pool.dtype == v_pool.dtype, "rows of another dtype"
        assert keys.shape == values.shape == row, "rows of another shape"

        def apply():  # MLX updates an array's data under the same Python object
            block_size = k_pool.shape[1]
            k_pool[slots // block_size, slots % block_size] = keys
            v_pool[slots // block_size, slots % block_size] = values

        returned = tables + 0  # a new array, as the kernel's output
        queue = self.queues.setdefault(id(k_pool), [])  # the closure keeps the pools (and ids)
        self.queues[id(v_pool)] = queue
        queue.append((returned, apply))
        return returned

    def land(self, pool, through=None) -> None:
        """The pending writes to `pool` up to the one that returned `through` (None: all)."""
        queue = self.queues.get(id(pool), [])
        ends = [
            i for i, (returned, _) in enumerate(queue) if through is None or returned is through
        ]
        if ends:
            for _, apply in queue[: ends[0] + 1]:
                apply()
            del queue[: ends[0] + 1]


@pytest.fixture
def in_place(monkeypatch):
    """The in-place path on: the real kernel on CUDA, `DeferredWrites` elsewhere, with every
    gather that can read a pool landing the writes it is ordered after. Returns a list of
    (storage, layer) per in-place write, in order."""
    from pagedkv.mlx_backend import attention
    from pagedkv.mlx_lm import batch, layer_cache

    monkeypatch.delenv(write.ENV, raising=False)
    if not CUDA:
        deferred = DeferredWrites()
        monkeypatch.setattr(write, "write_rows", deferred.write_rows)
        monkeypatch.setattr(step_module, "in_place_device", lambda: True)
        gather = attention.gather_batch

        def ordered_gather(pool, tables):
            deferred.land(pool, through=tables)
            return gather(pool, tables)

        for module in (attention, layer_cache, batch):
            monkeypatch.setattr(module, "gather_batch", ordered_gather)
        settle = KVStorage.settle

        def landing_settle(self, layer=None):
            for n in range(len(self._keys)) if layer is None else [layer]:
                if n in self.unsettled:
                    deferred.land(self._keys[n])
            settle(self, layer)

        monkeypatch.setattr(KVStorage, "settle", landing_settle)
    writes: list[tuple[KVStorage, int]] = []
    original = KVStorage.write_in_place

    def counted(self, layer, *args):
        writes.append((self, layer))
        return original(self, layer, *args)

    monkeypatch.setattr(KVStorage, "write_in_place", counted)
    return writes


def writes_to(store, writes) -> list[int]:
    """The layers of the in-place writes to this store's pools (a batch's probe has its own)."""
    return [layer for storage, layer in writes if storage is store.cache.storage]


READERS = ["gather", "attention_decode", "attention_prefill", "write_kv", "copy_rows", "keys"]


@pytest.mark.parametrize("reader", READERS)
def test_every_other_use_of_a_pool_comes_after_a_pending_in_place_write(in_place, reader):
    """A row written in place and not yet read through its tables (as in the middle of a decode
    step): each backend operation that reads or rewrites the pool sees it."""
    from pagedkv.mlx_backend import PagedCache

    cache = PagedCache(config(num_layers=2))
    seq, _ = cache.add_sequence([1, 2, 3, 4, 5])
    rng = np.random.default_rng(3)
    history = mx.array(rng.normal(size=(2, 6, 2, 8)).astype(np.float32))  # [K/V, positions, h, d]
    cache.write_kv(seq, 1, 0, history[0, :5], history[1, :5])
    cache.extend(seq, [6])
    block = int(cache.block_table_array(seq)[5 // 4])
    slot = mx.array([block * 4 + 5 % 4], dtype=mx.int32)
    cache.storage.write_in_place(
        1, slot, history[0, 5:], history[1, 5:], mx.zeros((1, 2), mx.int32)
    )
    want_k, want_v = history[0], history[1]
    queries = mx.array(rng.normal(size=(1, 2, 8)).astype(np.float32))
    if reader == "gather":
        keys, values = cache.gather(seq, 1)
        assert mx.array_equal(keys, want_k).item() and mx.array_equal(values, want_v).item()
    elif reader == "attention_decode":
        got = cache.attention_decode(1, [seq], queries)
        want = mx.fast.scaled_dot_product_attention(
            queries[:, :, None], want_k.transpose(1, 0, 2)[None],
            want_v.transpose(1, 0, 2)[None], scale=8**-0.5,
        )[:, :, 0]  # fmt: skip
        assert mx.abs(got - want).max().item() < 1e-5
    elif reader == "attention_prefill":
        from pagedkv.mlx_backend.attention import attention_prefill

        got = attention_prefill(cache, seq, 1, queries)
        want = mx.fast.scaled_dot_product_attention(
            queries.transpose(1, 0, 2)[None], want_k.transpose(1, 0, 2)[None],
            want_v.transpose(1, 0, 2)[None], scale=8**-0.5,
        )[0].transpose(1, 0, 2)  # fmt: skip
        assert mx.abs(got - want).max().item() < 1e-5
    elif reader == "write_kv":  # a functional write of the same pool, another position
        cache.extend(seq, [7])
        cache.write_kv(seq, 1, 6, history[0, :1], history[1, :1])
        keys, _ = cache.gather(seq, 1)
        assert mx.array_equal(keys[:6], want_k).item() and mx.array_equal(keys[6], want_k[0]).item()
    elif reader == "copy_rows":  # copy-on-write of the written block into a free one
        free = next(b for b in range(cache.config.num_blocks) if b != block and b != 0)
        cache.storage.copy_rows(block, free, 2)
        copied = cache.storage.pools(1)[0][free, :2]
        assert mx.array_equal(copied, want_k[4:6]).item()
    else:
        k_pool = cache.storage.keys[1]
        assert mx.array_equal(k_pool[block, 1], want_k[5]).item()


def functional_store(model, **kwargs):
    store = PagedKVStore.for_model(model, **kwargs)
    store.in_place_writes = False
    return store


def pipelined_decode(model, caches, prompt: list[int], steps: int, between=None):
    """mlx-lm's generate_step schedule: prefill, then build step n + 1 and `async_eval` it before
    reading step n's token. `between(n)` runs after step n is built, before it is evaluated.
    Returns the greedy tokens and the last step's logits."""
    logits = model(mx.array(prompt)[None], cache=caches)[:, -1]
    token = mx.argmax(logits, axis=-1)
    mx.eval(token)
    tokens = []
    for n in range(steps):
        logits = model(token[:, None], cache=caches)[:, -1]
        following = mx.argmax(logits, axis=-1)
        mx.async_eval(following)
        if between is not None:
            between(n)
        tokens.append(token.item())
        token = following
    tokens.append(token.item())
    return tokens, logits


def pool_bytes(store, session) -> list[np.ndarray]:
    return [
        np.array(part.astype(mx.float32))
        for layer in range(store.config.num_layers)
        for part in store.cache.gather(session.seq, layer)
    ]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_a_pipelined_decode_writes_in_place_and_matches_functional_writes(in_place, dtype):
    model = tiny_model("llama", seed=2, dtype=dtype)
    prompt = prompt_tokens(11, seed=4)
    results = []
    for make in (PagedKVStore.for_model, functional_store):
        store = make(model, num_blocks=32, block_size=4)
        session = store.open(prompt)
        tokens, logits = pipelined_decode(model, session.caches, prompt, steps=14)
        results.append((tokens, logits, pool_bytes(store, session), writes_to(store, in_place)))
        store.check_invariants()
        session.close()
        store.close()
    (tokens, logits, pools, layers), (f_tokens, f_logits, f_pools, _) = results
    count = model.args.num_hidden_layers
    assert layers == list(range(1, count)) * 14  # every later layer of every decode step
    assert tokens == f_tokens
    assert mx.array_equal(logits, f_logits).item()
    for got, want in zip(pools, f_pools):
        np.testing.assert_array_equal(got, want)


def test_a_batch_decodes_in_place_with_rows_in_different_blocks(in_place):
    model = tiny_model("llama", seed=5)
    prompts = [prompt_tokens(n, seed=n) for n in (5, 9, 14)]
    outputs = []
    for make in (PagedKVStore.for_model, functional_store):
        store = make(model, num_blocks=48, block_size=4)
        sessions = [store.open(p) for p in prompts]
        for session, prompt in zip(sessions, prompts):  # each prompt through its own caches
            mx.eval(model(mx.array(prompt)[None], cache=session.caches))
        caches = store.batch(sessions)
        token = mx.array([[p[-1]] for p in prompts])
        steps = []
        for _ in range(9):  # pipelined as mlx-lm's batch generator: one async step ahead
            logits = model(token, cache=caches)[:, -1]
            token = mx.argmax(logits, axis=-1)[:, None]
            mx.async_eval(token)
            steps.append(logits)
        mx.eval(steps)
        outputs.append(
            (steps, [pool_bytes(store, s) for s in sessions], writes_to(store, in_place))
        )
        for session in sessions:
            session.close()
        store.close()
    (steps, pools, layers), (f_steps, f_pools, _) = outputs
    assert layers == list(range(1, model.args.num_hidden_layers)) * 9
    for got, want in zip(steps, f_steps):
        assert mx.array_equal(got, want).item()
    for got, want in zip(pools, f_pools):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_operations_between_in_place_steps_see_and_keep_every_row(in_place):
    """Between pipelined steps, before they are evaluated: another request opens on the shared
    prefix and prefills (functional writes of the same pools), the first is trimmed and decodes
    over the trimmed positions again, a third is closed and its blocks reused. Every pool read
    and written afterwards holds what functional writes give."""
    model = tiny_model("qwen3", seed=1)
    prompt = prompt_tokens(12, seed=9)
    results = []
    for make in (PagedKVStore.for_model, functional_store):
        store = make(model, num_blocks=40, block_size=4)
        first, short = store.open(prompt), store.open(prompt_tokens(6, seed=2))
        mx.eval(model(mx.array(short.remaining_prompt)[None], cache=short.caches))
        others = []

        def between(n, store=store, first=first, short=short, others=others):
            if n == 3:  # a second request on the first's prefix, prefilled mid-decode
                other = store.open(prompt + [7, 8])
                others.append(other)
                mx.eval(model(mx.array(other.remaining_prompt)[None], cache=other.caches))
            if n == 5:
                short.close()  # its blocks go back to the pool for the steps that follow
            if n == 6:
                for cache in first.caches:
                    cache.trim(2)

        tokens, logits = pipelined_decode(model, first.caches, prompt, 12, between)
        other = others[0]
        more, _ = pipelined_decode(model, other.caches, [tokens[-1]], 4)
        results.append((tokens, more, pool_bytes(store, first), pool_bytes(store, other)))
        assert writes_to(store, in_place) or make is functional_store  # the in-place path ran
        store.check_invariants()
        store.close()
    (tokens, more, a, b), (f_tokens, f_more, f_a, f_b) = results
    assert tokens == f_tokens and more == f_more
    for got, want in zip(a + b, f_a + f_b):
        np.testing.assert_array_equal(got, want)


def test_a_model_that_reads_another_layers_history_each_step_does_not_wait_for_it(
    in_place, monkeypatch
):
    """afm7's K/V-reusing layers (as gemma3n's shared ones) call `keys_and_values()` on another
    layer's cache every step. That read goes through the tables the layer's in-place write returned (nothing
    settled during the decode) and gives what functional writes give."""
    from tests.parity import zoo

    model = zoo.build("afm7", seed=1)
    prompt = prompt_tokens(9, seed=5)
    settled = []
    settle = KVStorage.settle

    def counted(self, layer=None):
        if self.unsettled and (layer is None or layer in self.unsettled):
            settled.append(layer)
        settle(self, layer)

    results = []
    for make in (PagedKVStore.for_model, functional_store):
        store = make(model, num_blocks=32, block_size=4)
        session = store.open(prompt)
        mx.eval(model(mx.array(prompt)[None], cache=session.caches))
        monkeypatch.setattr(KVStorage, "settle", counted)  # from the first decode step on
        tokens, logits = pipelined_decode(model, session.caches, [prompt[-1]], 8)
        monkeypatch.setattr(KVStorage, "settle", settle)
        results.append((tokens, logits, writes_to(store, in_place)))
        store.close()
    (tokens, logits, layers), (f_tokens, f_logits, _) = results
    assert layers and settled == []
    assert tokens == f_tokens and mx.array_equal(logits, f_logits).item()


@pytest.mark.parametrize("odd", ["values float16", "keys float16", "values numpy"])
def test_a_later_layer_given_rows_the_kernel_cannot_take_goes_the_checked_way(in_place, odd):
    """The in-place kernel reads rows as the pool's dtype and row shape. A later layer's rows of
    another dtype, or not an mx.array, take the checked path (cast, or refused with nothing
    changed) and never reach it."""
    cfg = config(num_layers=3, num_kv_heads=2, head_dim=8)
    stores = [PagedKVStore(cfg), PagedKVStore(cfg)]
    stores[1].in_place_writes = False
    rng = np.random.default_rng(4)
    rows = [mx.array(rng.normal(size=(1, 2, n, 8)).astype(np.float32)) for n in (5, 1, 1, 1)]
    results = []
    for store in stores:
        session = store.open([1, 2, 3, 4, 5])
        for cache in session.caches:
            cache.update_and_fetch(rows[0], rows[0] + 1)
        session.caches[0].update_and_fetch(rows[1], rows[1] + 1)  # the step's first layer
        keys, values = rows[2], rows[2] + 1
        if odd == "values numpy":
            with pytest.raises(KVShapeError):
                session.caches[1].update_and_fetch(keys, np.array(values))
            assert session.offsets == [6, 5, 5]
        else:
            if odd == "keys float16":
                keys = keys.astype(mx.float16)
            else:
                values = values.astype(mx.float16)
            session.caches[1].update_and_fetch(keys, values)
        session.caches[1 if odd == "values numpy" else 2].update_and_fetch(rows[3], rows[3] + 1)
        results.append(pool_bytes(store, session))
    assert writes_to(stores[0], in_place)  # the in-place path was on for the other layers
    for got, want in zip(*results):
        np.testing.assert_array_equal(got, want)


def test_a_second_thread_makes_the_store_write_functionally_from_then_on(in_place):
    model = tiny_model("llama", seed=7)
    prompt = prompt_tokens(8, seed=3)
    results = []
    for make in (PagedKVStore.for_model, functional_store):
        store = make(model, num_blocks=40, block_size=4)
        first = store.open(prompt)
        tokens, _ = pipelined_decode(model, first.caches, prompt, 5)
        count = len(writes_to(store, in_place))
        assert count or make is functional_store
        seen = []

        def elsewhere(store=store, seen=seen):
            other = store.open(prompt_tokens(5, seed=8))
            mx.eval(model(mx.array(other.remaining_prompt)[None], cache=other.caches))
            seen.append(pool_bytes(store, other))
            other.close()

        worker = threading.Thread(target=elsewhere)
        worker.start()
        worker.join()
        assert store.shared
        later, _ = pipelined_decode(model, first.caches, [tokens[-1]], 5)
        assert len(writes_to(store, in_place)) == count  # shared: functional writes from then on
        results.append((tokens + later, pool_bytes(store, first), seen[0]))
        store.close()
    (tokens, a, b), (f_tokens, f_a, f_b) = results
    assert tokens == f_tokens
    for got, want in zip(a + b, f_a + f_b):
        np.testing.assert_array_equal(got, want)
