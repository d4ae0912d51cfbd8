"""mlx-lm's per-layer cache protocol over the paged store."""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

from pagedkv.errors import InvalidArgumentError, KVShapeError
from pagedkv.mlx_backend.attention import decode_attention, gather_batch

if TYPE_CHECKING:
    from pagedkv.mlx_lm.session import Session
    from pagedkv.mlx_lm.store import PagedKVStore


class PagedLayerCache:
    """mlx-lm's cache protocol for one layer of one or more sessions."""

    def __init__(self, store: PagedKVStore, layer: int, sessions: list[Session]) -> None:
        self.store = store
        self.layer = layer
        self.sessions = sessions
        self._fetched: tuple[mx.array, mx.array] | None = None  # the last decode fetch, lazy

    # -- what the model reads --------------------------------------------------------------------

    @property
    def offset(self):
        if len(self.sessions) == 1:
            return self.sessions[0].offsets[self.layer]
        return mx.array([s.offsets[self.layer] for s in self.sessions], dtype=mx.int32)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        batch, heads, count, dim = keys.shape
        cfg, cache = self.store.config, self.store.cache
        if batch != len(self.sessions) or heads != cfg.num_kv_heads or dim != cfg.head_dim:
            raise KVShapeError(
                f"update_and_fetch got keys {tuple(keys.shape)}; this cache expects "
                f"[{len(self.sessions)}, {cfg.num_kv_heads}, L, {cfg.head_dim}]."
            )
        if batch > 1 and count > 1:  # extending several sequences by several tokens is not atomic
            raise InvalidArgumentError(
                f"a batched cache takes one token per sequence per call (decode), got {count}; "
                "prefill each request through its own session.caches first."
            )
        self._fetched = None  # drop the lazy gather of the last step before the pools are written
        dtype = cache.storage.dtype
        keys = keys.transpose(0, 2, 1, 3)  # [B, L, kv_heads, head_dim]
        values = values.transpose(0, 2, 1, 3)
        if keys.dtype != dtype or values.dtype != dtype:  # an astype is an op even when a no-op
            keys, values = keys.astype(dtype), values.astype(dtype)
        self._reserve(count)
        starts = [session.offsets[self.layer] for session in self.sessions]
        if len(self.sessions) == 1:
            cache.write_kv(self.sessions[0].seq, self.layer, starts[0], keys[0], values[0])
        else:  # one scatter per pool for the whole batch
            cache.write_kv_batch([s.seq for s in self.sessions], self.layer, starts, keys, values)
        for session, start in zip(self.sessions, starts):
            session.offsets[self.layer] = start + count
        if self.layer == cfg.num_layers - 1:
            for session in self.sessions:  # the whole prompt is in every layer: publish it
                if not session.committed and session.offsets[self.layer] >= len(session.prompt):
                    cache.commit(session.seq)
                    session.committed = True
        fetched = self._fetch()
        if count == 1:  # decode: routed attention may answer in place, leaving these unevaluated
            self._fetched = fetched
        return fetched

    def routed_attention(self, queries, keys, values, scale, mask, sinks) -> mx.array | None:
        """Decode attention straight from the pools (the fused kernel where dispatch allows), for
        `routing.paged_sdpa`. Answers only the exact call it can: the keys and values this cache
        just returned, one query per session, a float scale, a mask this cache made (or none),
        sinks of one logit per query head. Otherwise returns None and the model attends over the
        fetched history as before."""
        fetched, self._fetched = self._fetched, None
        if not self.store.routes_attention:
            return None
        if fetched is None or keys is not fetched[0] or values is not fetched[1]:
            return None
        cfg = self.store.config
        if (
            queries.ndim != 4
            or queries.shape[0] != len(self.sessions)
            or queries.shape[2] != 1
            or queries.shape[3] != cfg.head_dim
            or queries.shape[1] % cfg.num_kv_heads
            or not mx.issubdtype(queries.dtype, mx.floating)
            or isinstance(scale, bool)
            or not isinstance(scale, (int, float))
        ):
            return None
        if sinks is not None and (
            not isinstance(sinks, mx.array) or tuple(sinks.shape) != (queries.shape[1],)
        ):
            return None
        known, window = self.store.mask_window(mask)
        if not known:
            return None
        storage = self.store.cache.storage
        batch = self.store.decode_batch(self.sessions, self.layer, window)
        out = decode_attention(
            queries[:, :, 0, :],
            storage.keys[self.layer],
            storage.values[self.layer],
            batch,
            float(scale),
            sinks,
        )
        self.store.routed_calls += 1
        return out[:, :, None, :]

    def _reserve(self, count: int) -> None:
        """The first layer to reach new positions reserves them for every layer."""
        cache = self.store.cache
        growing = []
        for session in self.sessions:
            session._require_open()
            end = session.offsets[self.layer] + count
            if end > cache.sequence_length(session.seq):
                growing.append((session, cache.sequence_length(session.seq), end))
        if count == 1 and len(growing) > 1:  # batched decode: one operation, all or nothing
            cache.decode_step(
                [s.seq for s, _, _ in growing],
                [s._tokens_for(start, end)[0] for s, start, end in growing],
            )
            return
        for session, start, end in growing:
            cache.extend(session.seq, session._tokens_for(start, end))

    def _fetch(self) -> tuple[mx.array, mx.array]:
        cache, layer = self.store.cache, self.layer
        length = max(s.offsets[layer] for s in self.sessions)
        tables = self.store.padded_tables(self.sessions)
        keys = gather_batch(cache.storage.keys[layer], tables)[:, :, :length]
        values = gather_batch(cache.storage.values[layer], tables)[:, :, :length]
        return keys, values

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        offsets = [s.offsets[self.layer] for s in self.sessions]
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
        """Drops the last n positions of this layer (all sessions); returns how many."""
        trimmed = min(n, min(s.offsets[self.layer] for s in self.sessions))
        for session in self.sessions:
            session.offsets[self.layer] -= trimmed
            session._sync_length()
        return trimmed

    def size(self) -> int:
        return max(s.offsets[self.layer] for s in self.sessions)

    def empty(self) -> bool:
        return all(s.offsets[self.layer] == 0 for s in self.sessions)

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
        return tuple(str(s.offsets[self.layer]) for s in self.sessions)

    @property
    def nbytes(self) -> int:
        """Bytes of this layer's K/V blocks held by the sessions (each shared block once)."""
        cfg, cache = self.store.config, self.store.cache
        blocks = {int(b) for s in self.sessions for b in cache.block_table_array(s.seq)}
        return len(blocks) * cfg.bytes_per_block // cfg.num_layers
