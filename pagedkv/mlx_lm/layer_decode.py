"""A layer's part of a decode step (mixed into `PagedLayerCache`): the hot path of decoding.

The step's first layer in a group takes `PagedLayerCache.update_and_fetch`'s checked path and
records the step (`step.py`); every later layer finds it (`_step_for`), writes its rows to the
same slots (`_write_in_step`: in place on CUDA, `kernels/write.py`) and fetches its history
(`_fetch_in`: placeholders for a caller proven to pass them to the routed helper). The routed
helper then asks the cache for attention straight from the pools (`routed_attention`).
"""

from __future__ import annotations

import threading
from types import CodeType

import mlx.core as mx

from pagedkv.errors import InvalidArgumentError
from pagedkv.mlx_lm import routing
from pagedkv.mlx_lm.callers import HELPER, passes_history_through
from pagedkv.mlx_lm.step import DecodeStep

FLOATS = (mx.float16, mx.bfloat16, mx.float32)
# update_and_fetch methods that call this class's (batch.py's): the model's frame is above them.
# Keyed by id: hashing a code object hashes its bytecode; the value keeps the id from being reused.
ADAPTER_CODES: dict[int, CodeType] = {}


class DecodeStepLayer:
    """Expects (from `PagedLayerCache`): `store`, `cache`, `layer`, `group`, `slot`, `sessions`,
    `_plain`, `_row_shape`, `_dtype`, `_fetched`, `_written`, `_unfetched` and `_gather`."""

    def _step_for(self, keys, values) -> DecodeStep | None:
        """The group's current decode step if this call is a later layer's part of it: one new
        position per session at the starts the step wrote, under the clock it wrote at, rows of
        exactly the pool's shape and dtype, every session open and its prompt published. Else
        None (the full path)."""
        step = self.store.steps[self.group]
        if step is None or not self._plain or step.thread != threading.get_ident():
            return None
        if not isinstance(keys, mx.array) or not isinstance(values, mx.array):
            return None
        if keys.shape != self._row_shape or values.shape != keys.shape:
            return None  # also a batch of another size: _row_shape is [B, kv_heads, 1, dim]
        if keys.dtype != self._dtype or values.dtype != self._dtype:
            return None
        if step.clock != self.cache.clock or not step.published:
            return None  # the full path publishes a prompt when its last layer is written
        group, slot, sessions = self.group, self.slot, self.sessions
        if len(sessions) == 1:  # the usual single request, without building lists
            session = sessions[0]
            session._require_open()
            if session.offsets[slot] != step.starts[0] or session.seqs[group] != step.seqs[0]:
                return None
            return step
        for session in sessions:
            session._require_open()
        if [s.offsets[slot] for s in sessions] != step.starts:
            return None
        return step if [s.seqs[group] for s in sessions] == step.seqs else None

    def _write_in_step(self, step: DecodeStep, keys, values, caller) -> tuple[mx.array, mx.array]:
        """This layer's rows to the slots the step's first layer wrote (checked there), under the
        cache's lock like every write: in place where the step allows it (one kernel for both
        pools, `kernels/write.py`), else one update per pool."""
        self._fetched = None  # the last step's lazy gather would make the write copy the pool
        cache, batch = self.cache, len(self.sessions)
        storage, layer, store, group = cache.storage, self.layer, self.store, self.group
        last = layer == cache.config.num_layers - 1  # the step's last layer in this group
        with store.lock:  # decided under `enter`'s lock: a newcomer waits for this write
            lazy = not store.shared and not last
            if lazy:  # the group's last layer schedules it (see store.enter)
                store.pending.setdefault(group, []).append(layer)
        if not lazy and store.pending:  # the step so far (or a shared store's first write)
            store.schedule_pending()
        tables = step.tables
        with cache._lock:  # as every write: a pool is read, updated and replaced
            if step.in_place and not store.shared:  # one thread: into the pools' own buffers
                rows = (batch, keys.shape[1], keys.shape[3])  # [B, kv_heads, dim]
                tables = storage.write_in_place(
                    layer, step.flat_slots(), keys.reshape(rows), values.reshape(rows), step.tables
                )
                if not lazy:
                    mx.async_eval(tables)
                self._written = (step, tables)
            else:
                storage.settle(layer)  # in-place writes of a store that became shared
                # One row: exactly the target slice's shape `[1, 1, kv_heads, dim]`, so the write
                # is one graph node besides the reshape (another shape would add a broadcast
                # node; each is host work when MLX evaluates the step). Several: `[B, kv_heads,
                # dim]` for the scatter.
                shape = (1, 1, *keys.shape[1::2]) if batch == 1 else (batch, *keys.shape[1::2])
                rows_k, rows_v = keys.reshape(shape), values.reshape(shape)
                k_pool, v_pool = storage.pools(layer)
                if batch == 1:  # the storage's one-run write, without building the run list
                    block, row = step.slots
                    k_pool[block : block + 1, row : row + 1] = rows_k
                    v_pool[block : block + 1, row : row + 1] = rows_v
                else:
                    k_pool[step.slots] = rows_k
                    v_pool[step.slots] = rows_v
                if not lazy:  # scheduled under the lock, as the backend's writes are
                    mx.async_eval(k_pool, v_pool)
            pools = storage.pools(layer)
        slot = self.slot
        for session in self.sessions:
            session.offsets[slot] += 1
        return self._fetch_in(step, pools, caller, tables)

    def _record_step(self, starts: list[int]) -> DecodeStep:
        """Records the decode step this layer just wrote, for the group's later layers."""
        cache, group, store = self.cache, self.group, self.store
        seqs = [s.seqs[group] for s in self.sessions]
        tables = [cache.block_table_array(seq) for seq in seqs]
        published = not store.prefix_sharing or all(s.committed for s in self.sessions)
        step = DecodeStep.build(
            cache.clock, seqs, published, tables, starts, cache.size, store.in_place_writes
        )
        store.steps[group] = step  # one assignment: threads never see half a step
        return step

    def _fetch_in(self, step: DecodeStep, pools: tuple[mx.array, mx.array], caller, tables=None):
        """The decode fetch from `pools`: the pool arrays as this layer's write left them. Not
        `storage.keys[layer]` read later: by then another thread may have replaced it with a
        write still running on that thread's stream, which this thread cannot wait for (MLX:
        "There is no Stream ... in current thread"). A caller proven to hand the history straight
        to the routed helper (`caller`: the model's frame) gets placeholders, which the helper
        answers from `pools` (callers.py); any other caller gets the lazy history, left
        unevaluated when routed attention answers. `tables`: the step's tables as this layer's
        write returned them (in place: reading through them waits for the write)."""
        tables = step.tables if tables is None else tables
        if self._history_unread(caller):
            keys, values = self._unfetched
            self._fetched = (keys, values, step, pools, tables)
            return keys, values
        keys, values = self._gather(tables, step.length, pools)
        self._fetched = (keys, values, step, pools, tables)
        return keys, values

    def _history_unread(self, frame) -> bool:
        """Whether the model function at `frame` (this call's caller) passes the fetched history
        only to the routed helper, which this store answers (callers.py)."""
        if not self._plain or self.store._unroute is None:  # not routed: nothing answers
            return False
        code = frame.f_code
        while ADAPTER_CODES.get(id(code)) is code:
            frame = frame.f_back
            code = frame.f_code
        if frame.f_globals.get(HELPER) is not routing.paged_sdpa:
            return False
        return passes_history_through(code)

    def routed_attention(self, queries, keys, values, scale, mask, sinks, extra=False):
        """Decode attention straight from the pools (the fused kernel where dispatch allows), for
        `routing.paged_sdpa`. Returns (output, keys, values). It answers only the exact call it
        can: the keys and values this cache just returned, one query per session, a float scale,
        a mask this cache made (or none), sinks of one logit per query head, no `extra` keyword
        arguments. Otherwise the output is None and keys/values are what the model's own
        attention must use: the arguments, with placeholders replaced by the real history.
        Raises InvalidArgumentError for placeholders this cache did not just hand out."""
        fetched = self._fetched
        if fetched is None or keys is not fetched[0] or values is not fetched[1]:
            if _is_placeholder(keys) or _is_placeholder(values):
                raise InvalidArgumentError(
                    "attention got a paged cache's placeholder history that is not the one "
                    "this cache's last update_and_fetch returned; pass update_and_fetch's "
                    "result straight to scaled_dot_product_attention."
                )
            return None, keys, values
        self._fetched = None  # consumed: the lazy history must not outlive the call
        out = None if extra else self._attend(fetched, queries, scale, mask, sinks)
        if out is None and keys is self._unfetched[0]:  # the history the model must read after all
            step, pools, tables = fetched[2:]
            keys, values = self._gather(tables, step.length, pools)
        return out, keys, values

    def _attend(self, fetched, queries, scale, mask, sinks) -> mx.array | None:
        """The routed output for `routed_attention`, or None where the call is not one it answers."""
        if self.store._unroute is None or not self._plain:
            return None  # unrouted, or a layer zero-padded into its group's pool (gather slices it)
        shape = queries.shape if isinstance(queries, mx.array) else ()
        batch, kv_heads, _, head_dim = self._row_shape  # one query per session, the pool's dim
        if (
            len(shape) != 4
            or shape[0] != batch
            or shape[2] != 1
            or shape[3] != head_dim
            or shape[1] % kv_heads
            or queries.dtype not in FLOATS
            or not isinstance(scale, (int, float))
            or isinstance(scale, bool)
        ):
            return None
        if sinks is not None and (not isinstance(sinks, mx.array) or sinks.shape != (shape[1],)):
            return None
        if mask is None:
            window = None
        else:
            known, window = self.store.mask_window(mask)
            if not known:
                return None
        step, (k_pool, v_pool), tables = fetched[2:]  # as this layer's write left them
        out = step.attend(queries, k_pool, v_pool, window, float(scale), sinks, tables)
        self.store.routed_calls += 1
        return out

    def _written_now(self) -> tuple | None:
        """(step, tables) of this layer's in-place write in the group's current decode step, if
        that write is the layer's pending one and nothing changed since (the step's key): the
        history is then the step's, read through the tables the write returned. afm7 and
        gemma3n read another layer's history every step (`keys_and_values`); settling it
        instead would wait for the step in flight."""
        written = self._written
        if written is None:
            return None
        step, tables = written
        if self.cache.storage.unsettled.get(self.layer) is not tables:
            return None  # settled, or written again since
        if step is not self.store.steps[self.group] or step.clock != self.cache.clock:
            return None
        slot, sessions = self.slot, self.sessions
        if [s.offsets[slot] - 1 for s in sessions] != step.starts:
            return None
        return written if [s.seqs[self.group] for s in sessions] == step.seqs else None


def _is_placeholder(array) -> bool:
    """A cache's `_unfetched` array (empty, one axis): no real K/V history looks like it."""
    return isinstance(array, mx.array) and array.shape == (0,)
