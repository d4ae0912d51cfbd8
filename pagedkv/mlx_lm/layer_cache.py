"""mlx-lm's per-layer cache protocol over the paged store (its decode-step hot path:
`layer_decode.py`)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import mlx.core as mx

from pagedkv.errors import InvalidArgumentError, KVDtypeError, KVShapeError, OutOfBlocksError
from pagedkv.mlx_backend.attention import gather_batch
from pagedkv.mlx_lm.layer_decode import ADAPTER_CODES, FLOATS, DecodeStepLayer

if TYPE_CHECKING:
    from pagedkv.mlx_lm.session import Session
    from pagedkv.mlx_lm.store import PagedKVStore


class PagedLayerCache(DecodeStepLayer):
    """mlx-lm's cache protocol for one layer of one or more sessions."""

    def __init__(
        self, store: PagedKVStore, layer: int, sessions: list[Session], group: int = 0
    ) -> None:
        self.store = store
        self.layer = layer  # in the group's pool
        self.group = group  # which of the store's caches holds this layer (one per window size)
        self.cache = store.groups[group]
        self.slot = store.slot_of[(group, layer)]  # this layer's entry in session.offsets
        # the last decode fetch (lazy keys, values) and its step, for routed attention
        # (keys, values, DecodeStep, (k_pool, v_pool), tables: the step's, as the write left them)
        self._fetched: tuple | None = None
        self._written: tuple | None = None  # (DecodeStep, tables) of the last in-place write
        self._unfetched: tuple  # this cache's placeholders (see _set_sessions)
        cfg = self.cache.config
        # rows of exactly the pool's shape (not zero-padded into it): decode's fast path applies
        self._plain = store.layer_shapes[self.slot] == (cfg.num_kv_heads, cfg.head_dim) * 2
        self._set_sessions(sessions)
        storage = self.cache.storage  # None for a metadata-only cache (no decode step then)
        self._dtype = storage.dtype if storage is not None else None

    def _set_sessions(self, sessions: list[Session]) -> None:
        """The sessions this cache serves, and what depends on their number."""
        self.sessions = sessions
        cfg = self.cache.config
        # one decode position per session in the pool's shape: `[B, kv_heads, 1, head_dim]`
        self._row_shape = (len(sessions), cfg.num_kv_heads, 1, cfg.head_dim)
        # What a decode fetch returns to a caller proven to pass it straight to the routed
        # helper (callers.py): two empty arrays of this cache's own, never read. Where the
        # helper cannot answer, it builds the real history in their place; anything else given
        # them fails loudly (InvalidArgumentError, or a shape error), never silently.
        self._unfetched = (mx.zeros((0,)), mx.zeros((0,)))
        self._fetched = None

    # -- what the model reads --------------------------------------------------------------------

    @property
    def offset(self):
        if len(self.sessions) == 1:
            return self.sessions[0].offsets[self.slot]
        offsets = tuple([s.offsets[self.slot] for s in self.sessions])
        cached, array = self.store._offsets  # one read: another thread may replace the pair
        if cached != offsets:
            array = mx.array(offsets, dtype=mx.int32)
            self.store._offsets = (offsets, array)
        return array

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        step = self._step_for(keys, values)
        if step is not None:  # a later layer of a decode step: see step.py
            return self._write_in_step(step, keys, values, sys._getframe(1))
        count = self._validate(keys, values)
        self.store.enter()  # another thread's lazy writes are scheduled before this one's
        cache, group = self.cache, self.group
        self._fetched = None  # drop the lazy gather of the last step before the pools are written
        keys, values = self._pool_rows(keys), self._pool_rows(values)  # [B, L, kv_heads, dim]
        self._reserve(count)
        starts = [session.offsets[self.slot] for session in self.sessions]
        storage, layer = cache.storage, self.layer
        with cache._lock:  # the pools as this write left them (see _fetch_in)
            if len(self.sessions) == 1:  # [L, kv_heads, dim]: a reshape, not an index
                keys, values = keys.reshape(keys.shape[1:]), values.reshape(values.shape[1:])
                cache.write_kv(self.sessions[0].seqs[group], layer, starts[0], keys, values)
            else:  # one scatter per pool for the whole batch
                seqs = [s.seqs[group] for s in self.sessions]
                cache.write_kv_batch(seqs, layer, starts, keys, values)
            pools = storage.pools(layer)  # settled by the write
        for session, start in zip(self.sessions, starts):
            session.offsets[self.slot] = start + count
        if self.store.prefix_sharing:
            for session in self.sessions:  # the whole prompt is in every layer: publish it
                if not session.committed and min(session.offsets) >= len(session.prompt):
                    for group_cache, seq in zip(self.store.groups, session.seqs):
                        group_cache.commit(seq)
                    session.committed = True
        if count > 1:
            return self._fetch(pools)
        step = self._record_step(starts)  # decode: the group's later layers reuse this step
        return self._fetch_in(step, pools, sys._getframe(1))

    def _validate(self, keys, values) -> int:
        """Every check before the first change; returns the number of new positions."""
        k_heads, k_dim, v_heads, v_dim = self.store.layer_shapes[self.slot]
        batch = len(self.sessions)
        for session in self.sessions:
            session._require_open()
        for name, array, heads, dim in (
            ("keys", keys, k_heads, k_dim),
            ("values", values, v_heads, v_dim),
        ):
            if not isinstance(array, mx.array):
                raise KVShapeError(
                    f"update_and_fetch {name} must be an mx.array, got {type(array).__name__}."
                )
            if array.ndim != 4 or (array.shape[0], array.shape[1], array.shape[3]) != (
                batch,
                heads,
                dim,
            ):
                raise KVShapeError(
                    f"update_and_fetch got {name} {tuple(array.shape)}; layer {self.layer} of "
                    f"this cache expects [{batch}, {heads}, L, {dim}]."
                )
            if array.dtype not in FLOATS:
                raise KVDtypeError(
                    f"update_and_fetch {name} are {array.dtype}; pass float16, bfloat16 or float32."
                )
        count = keys.shape[2]
        if values.shape[2] != count or count < 1:
            raise KVShapeError(
                f"update_and_fetch got {count} key positions and {values.shape[2]} value "
                "positions; pass the same number (at least one)."
            )
        if batch > 1 and count > 1:  # extending several sequences by several tokens is not atomic
            raise InvalidArgumentError(
                f"a batched cache takes one token per sequence per call (decode), got {count}; "
                "prefill each request through its own session.caches first."
            )
        return count

    def _pool_rows(self, array: mx.array) -> mx.array:
        """`[B, heads, L, dim]` -> `[B, L, kv_heads, head_dim]` in the pool's dtype, zero-padded
        when this layer's K or V is smaller than the pool's rows (per-layer shapes, MLA)."""
        cfg = self.cache.config
        if array.shape[2] == 1:  # one position: the same memory order, a reshape is enough
            array = array.reshape(array.shape[0], 1, array.shape[1], array.shape[3])
        else:
            array = array.transpose(0, 2, 1, 3)
        if array.dtype != self.cache.storage.dtype:  # an astype is an op even when a no-op
            array = array.astype(self.cache.storage.dtype)
        heads, dim = array.shape[2], array.shape[3]
        if (heads, dim) != (cfg.num_kv_heads, cfg.head_dim):
            array = mx.pad(
                array, [(0, 0), (0, 0), (0, cfg.num_kv_heads - heads), (0, cfg.head_dim - dim)]
            )
        return array

    def _reserve(self, count: int) -> None:
        """The first layer to reach new positions reserves them for every layer, in every group's
        cache: each group is checked first, so a step that cannot get its blocks changes nothing."""
        with self.store.lock:  # no other thread's step between the checks and the changes
            self._reserve_locked(count)

    def _reserve_locked(self, count: int) -> None:
        store = self.store
        growing = []
        for session in self.sessions:
            end = session.offsets[self.slot] + count
            length = store.cache.sequence_length(session.seqs[0])  # equal in every group
            if end > length:
                growing.append((session, length, end))
        if not growing:
            return
        several = len(store.groups) > 1
        if count == 1 and len(growing) > 1:  # batched decode: one operation, all or nothing
            tokens = [s._tokens_for(start, end)[0] for s, start, end in growing]
            per_group = [[s.seqs[g] for s, _, _ in growing] for g in range(len(store.groups))]
            for cache, seqs in zip(store.groups, per_group):
                if several and not cache.can_decode_step(seqs):
                    _out_of_blocks(cache, f"a decode step of {len(seqs)} sessions")
            for cache, seqs in zip(store.groups, per_group):
                cache.decode_step(seqs, tokens)
            return
        for session, start, end in growing:
            for cache, seq in zip(store.groups, session.seqs):
                if several and not cache.can_extend(seq, end - start):
                    _out_of_blocks(cache, f"extending a session by {end - start} positions")
            for cache, seq in zip(store.groups, session.seqs):
                cache.extend(seq, session._tokens_for(start, end))

    def _fetch(self, pools: tuple[mx.array, mx.array] | None = None) -> tuple[mx.array, mx.array]:
        """The whole history, lazy, from `pools` (as this layer's write left them) or else the
        pools as they are now, read under the cache's lock: never in the middle of another
        thread's write, whose lazy result only that thread can evaluate."""
        if pools is None:
            storage, layer = self.cache.storage, self.layer
            with self.cache._lock:
                written = self._written_now()
                if written is not None:  # read through the write's tables: no waiting for it
                    step, tables = written
                    return self._gather(tables, step.length, storage.pools(layer))
                storage.settle(layer)  # read only after the decode writes made in place
                pools = storage.pools(layer)
        length = max(s.offsets[self.slot] for s in self.sessions)
        return self._gather(self.store.padded_tables(self.sessions, self.group), length, pools)

    def _gather(self, tables: mx.array, length: int, pools) -> tuple[mx.array, mx.array]:
        """`[B, heads, length, dim]` keys and values of this layer through padded tables, lazy."""
        k_pool, v_pool = pools
        k_heads, k_dim, v_heads, v_dim = self.store.layer_shapes[self.slot]
        keys = gather_batch(k_pool, tables)[:, :k_heads, :length, :k_dim]
        values = gather_batch(v_pool, tables)[:, :v_heads, :length, :v_dim]
        return keys, values

    def keys_and_values(self) -> tuple[mx.array, mx.array]:
        """The whole K/V history, as mlx-lm's KVCache returns it (afm7 reads it for reuse layers)."""
        return self._fetch()

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        offsets = [s.offsets[self.slot] for s in self.sessions]
        if len(set(offsets)) == 1 and window_size is None:  # like mlx-lm's own KVCache
            if N == 1:
                return None
            if not return_array:
                return "causal"
        total = max(offsets) + N
        queries = mx.array(offsets)[:, None] + mx.arange(N)[None, :]  # [B, N] positions
        keys = mx.arange(total)
        mask = keys[None, None, :] <= queries[:, :, None]  # [B, N, total]
        if window_size is not None:
            mask = mask & (keys[None, None, :] > queries[:, :, None] - window_size)
        mask = mask[:, None] if len(offsets) > 1 else mask[0]
        if N == 1:
            self.store.remember_mask(mask, window_size)
        return mask

    # -- the rest of mlx-lm's protocol -----------------------------------------------------------

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drops the last n positions of this layer (all sessions); returns n.

        Raises InvalidArgumentError unless n is an int in [0, offset] of every session and every
        session is open; nothing changes then."""
        for session in self.sessions:
            session._require_open()
        offset = min(s.offsets[self.slot] for s in self.sessions)
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= offset:
            raise InvalidArgumentError(
                f"trim({n!r}) on layer {self.layer}: pass an int in [0, {offset}] (the positions "
                "this cache holds)."
            )
        for session in self.sessions:  # a window may forbid the length this trim leads to
            offsets = list(session.offsets)
            offsets[self.slot] -= n
            session._check_trim_to(max(offsets))
        for session in self.sessions:
            session.offsets[self.slot] -= n
            session._sync_length()
        return n

    def size(self) -> int:
        return max(s.offsets[self.slot] for s in self.sessions)

    def empty(self) -> bool:
        return all(s.offsets[self.slot] == 0 for s in self.sessions)

    @property
    def state(self):
        """This layer's K/V for the sessions, `[B, kv_heads, T, head_dim]` (a gathered copy)."""
        return self._fetch()

    @state.setter
    def state(self, value) -> None:
        raise NotImplementedError(
            "a paged cache cannot be restored from a saved mlx-lm state; open a new session"
        )

    @property
    def meta_state(self):
        return tuple(str(s.offsets[self.slot]) for s in self.sessions)

    @property
    def nbytes(self) -> int:
        """Bytes of this layer's K/V blocks held by the sessions (each shared block once)."""
        cfg, cache = self.cache.config, self.cache
        tables = [cache.block_table_array(s.seqs[self.group]) for s in self.sessions]
        blocks = {int(b) for table in tables for b in table if b >= 0}
        return len(blocks) * (cfg.bytes_per_block // cfg.num_layers)


def _out_of_blocks(cache, asked: str) -> None:
    raise OutOfBlocksError(
        f"{asked} needs more blocks than the {cache.config.num_blocks}-block pool of the "
        f"{'window-' + str(cache.config.window) if cache.config.window else 'full-attention'} "
        "layers has free or evictable; nothing changed. Close sessions or use more blocks."
    )


_own = PagedLayerCache.update_and_fetch.__code__
ADAPTER_CODES[id(_own)] = _own
