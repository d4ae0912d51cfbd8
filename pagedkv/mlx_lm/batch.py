"""mlx-lm's batch protocol on the paged store, so `BatchGenerator` runs unmodified.

mlx-lm's `BatchGenerator` takes one cache list per request (`insert(..., caches=[...])`) and
then works on batches: `merge` (a classmethod over single-request caches), `filter`, `extend`,
`extract`, `prepare`/`finalize` around right-padded prompt chunks, `copy.deepcopy` when it splits
a batch, and `mx.eval(c.state)` after every prefill chunk. Here every request is a `Request` (one
sequence in each of the store's groups) and a batched layer cache is a list of requests, so these
are list edits:

    pool = RequestPool(store)
    caches, cached = pool.open(prompt)            # shares cached prefix blocks
    gen.insert([prompt[cached:]], caches=[caches])

Ownership: a request's blocks belong to its `Request` object. mlx-lm never calls a release
method; it drops caches (filter, remove, a finished response nobody keeps, an exception), so a
finalizer queues the request's sequences when the last cache referring to it is dropped and the
pool frees them at its next operation (`reap`). Freeing is deferred rather than done in the
finalizer because a finalizer can run in the middle of another store operation (garbage
collection), and the store is not reentrant.

Right padding is never stored: `prepare(lengths=...)` tells each layer how many of the coming
positions of each row are real, and only those are written, so `finalize` has nothing to drop.
Rows are left-aligned in their own block tables; `offset` is per row and masks are per row.
"""

from __future__ import annotations

import copy
import weakref
from collections import deque

import mlx.core as mx

from pagedkv.config import ceil_div
from pagedkv.errors import InvalidArgumentError, OutOfBlocksError
from pagedkv.mlx_backend.attention import gather_batch, pad_tables
from pagedkv.mlx_lm.kinds import FULL, WINDOW
from pagedkv.mlx_lm.layer_cache import ADAPTER_CODES, PagedLayerCache
from pagedkv.mlx_lm.session import Session
from pagedkv.mlx_lm.window import WindowLayerCache


class Request(Session):
    """One request's sequences, owned by this object: freed (via the pool) when it is dropped.

    Unlike `Session` it holds no cache list (that would be a reference cycle, and a cycle is
    freed only when the garbage collector runs): the caches refer to the request, not back."""

    def __init__(self, pool: RequestPool, seqs, prompt, cached: int) -> None:
        self.store = pool.store
        self.pool = pool
        self.prompt = list(prompt)
        self.cached_tokens = cached
        self.offsets = [cached] * len(pool.store.layer_shapes)
        self.committed = False
        self.closed = False
        self.max_tokens: int | None = None  # the decode budget admission reserved for
        self.admitted = False  # admission promised it its whole budget (forks inherit it)
        self.seqs: list[int] | None = None  # None: queued, not admitted (holds no blocks)
        if seqs is not None:
            self.own(seqs)

    def own(self, seqs) -> None:
        """Takes ownership of the request's sequences (one per group of the store)."""
        self.seqs = list(seqs)
        self._release = weakref.finalize(self, self.pool._dropped.append, tuple(self.seqs))
        self.pool.live.add(self)

    def _require_open(self) -> None:
        if self.seqs is None:
            raise OutOfBlocksError(
                "this request is queued for blocks (admission has not opened it); only a "
                "generator that admits requests (pagedkv.mlx_lm.admission) may run it."
            )
        super()._require_open()

    def close(self) -> None:
        """Frees the request's sequences now (its committed blocks stay cached)."""
        if not self.closed:
            self.closed = True
            if self.seqs is not None:
                self._release()
            self.pool.reap()

    def __deepcopy__(self, memo) -> Request:
        """A fork: shares every block (refcounts bumped); a later write copies a shared tail."""
        self._require_open()
        store = self.store
        seqs = [cache.fork(seq) for cache, seq in zip(store.groups, self.seqs)]
        child = Request(self.pool, seqs, self.prompt, self.cached_tokens)
        child.offsets, child.committed = list(self.offsets), self.committed
        child.max_tokens, child.admitted = self.max_tokens, self.admitted
        self.pool.opened += 1
        memo[id(self)] = child
        return child


class RequestPool:
    """Opens requests on a store for mlx-lm's batch loop and frees the ones mlx-lm dropped."""

    def __init__(self, store) -> None:
        store.require_batchable("RequestPool", "run it with mlx-lm's own caches")
        self.store = store
        self._dropped: deque[tuple[int, ...]] = deque()  # appended by finalizers, any thread
        self.live: weakref.WeakSet[Request] = weakref.WeakSet()  # requests holding sequences
        self.opened = 0  # requests opened or forked
        self.released = 0  # requests freed after mlx-lm dropped (or closed) them

    def reap(self) -> int:
        """Frees the sequences of requests that were dropped since the last call; returns how
        many requests that was. Called at the start of every batched cache operation."""
        freed = 0
        while self._dropped:
            with self.store.lock:  # the store's lock spans changes across its groups
                seqs = self._dropped.popleft()
                for cache, seq in zip(self.store.groups, seqs):
                    cache.free(seq)
            freed += 1
        self.released += freed
        return freed

    def open(self, prompt_tokens, namespace: str = "") -> tuple[list, int]:
        """(cache list for `BatchGenerator.insert(caches=...)`, cached prompt tokens). Feed
        `prompt_tokens[cached:]`. Raises OutOfBlocksError / InvalidTokensError; nothing changes."""
        self.reap()
        request = self.adopt(self.store.open(prompt_tokens, namespace))
        return self.caches([request]), request.cached_tokens

    def queue(self, prompt_tokens) -> Request:
        """A request that holds no blocks yet, expecting the prefix hit the store offers now
        (`cached_tokens`; feed the prompt from there). `open_queued` opens it later."""
        tokens = list(prompt_tokens)
        cached = min(cache.prefix_match(tokens) for cache in self.store.groups)
        return Request(self, None, tokens, cached)

    def open_queued(self, request: Request, limit: int | None = None) -> int:
        """Opens a queued request, sharing the longest cached prefix (at most `limit` tokens);
        returns the prompt tokens now cached: the caller feeds the prompt from there. Raises
        OutOfBlocksError; nothing changes then."""
        self.reap()
        prompt, groups = request.prompt, self.store.groups
        with self.store.lock:
            cap = min(cache.prefix_match(prompt) for cache in groups)
            cap = cap if limit is None else min(cap, limit)
            for cache in groups:  # every group is checked before any changes
                if not cache.can_add_sequence(prompt, "", cap):
                    raise OutOfBlocksError(
                        f"a queued request of {len(prompt)} tokens does not fit the "
                        f"{cache.config.num_blocks}-block pool yet; nothing changed."
                    )
            added = [cache.add_sequence(prompt, "", cap) for cache in groups]
        cached = added[0][1]
        request.cached_tokens, request.offsets = cached, [cached] * len(request.offsets)
        request.own([seq for seq, _ in added])
        self.opened += 1
        return cached

    def unopen(self, request: Request, cached: int) -> None:
        """Undoes `open_queued`: frees the request's sequences now and queues it again,
        expecting `cached` prompt tokens from the prefix index."""
        request._release.detach()
        for cache, seq in zip(self.store.groups, request.seqs):
            cache.free(seq)
        self.live.discard(request)
        request.seqs, request.cached_tokens = None, cached
        request.offsets = [cached] * len(request.offsets)
        self.opened -= 1

    def adopt(self, session: Session) -> Request:
        """Takes a store session's sequences over into a Request (the session is left closed
        without freeing them: they belong to the request now)."""
        session._require_open()
        request = Request(self, session.seqs, session.prompt, session.cached_tokens)
        session.closed, session.caches = True, None  # ownership moved; breaks its cycle
        self.opened += 1
        return request

    def caches(self, requests: list[Request]) -> list:
        """One batched cache per paged entry of the model's cache list, over these requests."""
        caches = []
        for entry in self.store.entries:
            if entry.kind == FULL:
                caches.append(BatchLayerCache(self.store, entry.layer, requests, entry.group))
            elif entry.kind == WINDOW:
                caches.append(
                    BatchWindowCache(self.store, entry.layer, requests, entry.window, entry.group)
                )
            else:
                caches.append(None)  # layers reading another layer's K/V (mlx-lm has None too)
        return caches

    def held_blocks(self) -> int:
        """Blocks held by live requests, every group (cached-only blocks not counted)."""
        return sum(cache.stats().in_use_blocks for cache in self.store.groups)


class _BatchProtocol:
    """merge/filter/extend/extract/prepare/finalize, cheap state, deepcopy, ragged prefill."""

    _remaining: list[int] | None = None  # real positions still to come per row (prepare)

    def _pool_of(self) -> RequestPool:
        return self.sessions[0].pool

    def _like(self, sessions):
        clone = copy.copy(self)
        clone._set_sessions(sessions)
        clone._remaining = None
        return clone

    @classmethod
    def merge(cls, caches):
        first = caches[0]
        sessions = [s for c in caches for s in c.sessions]
        for c in caches:
            if type(c) is not type(first) or c.store is not first.store or c.slot != first.slot:
                raise InvalidArgumentError(
                    "merge needs caches of one layer of one store (same class and slot)."
                )
        if len({id(s) for s in sessions}) != len(sessions):
            raise InvalidArgumentError("merge got one request twice; deepcopy it to fork it.")
        return first._like(sessions)

    def filter(self, batch_indices) -> None:
        keep = [int(i) for i in batch_indices]
        self._set_sessions([self.sessions[i] for i in keep])
        if self._remaining is not None:
            self._remaining = [self._remaining[i] for i in keep]

    def extend(self, other) -> None:
        if self._remaining is not None or other._remaining is not None:
            mine = self._remaining or [0] * len(self.sessions)
            self._remaining = mine + (other._remaining or [0] * len(other.sessions))
        self._set_sessions(self.sessions + other.sessions)

    def extract(self, idx: int):
        """A single-request cache over the same request (mlx-lm drops it from the batch next)."""
        return self._like([self.sessions[idx]])

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None) -> None:
        if left_padding is not None and any(left_padding):
            raise InvalidArgumentError("paged caches take right padding (lengths), not left.")
        if lengths is not None:
            self._remaining = [int(n) for n in lengths]

    def finalize(self) -> None:
        self._remaining = None  # padding was never stored: nothing to roll or drop

    def __deepcopy__(self, memo):
        sessions = [copy.deepcopy(s, memo) for s in self.sessions]
        return self._like(sessions)

    @property
    def state(self):
        """The layer's pool arrays (what mlx-lm evaluates after a prefill chunk): no copy."""
        storage = self.cache.storage
        with self.cache._lock:
            storage.settle(self.layer)  # as the pools are once the decode writes made in place end
            return storage.pools(self.layer)

    @state.setter
    def state(self, value) -> None:
        raise NotImplementedError("a paged cache cannot be restored from a saved mlx-lm state")

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        pool = self._pool_of()
        pool.reap()  # blocks of dropped requests return before this step reserves
        for session in self.sessions:
            if session.seqs is None:  # queued, run without a gate (mlx-lm's single-request path)
                _open_now(pool, session)
        count = keys.shape[2] if isinstance(keys, mx.array) and keys.ndim == 4 else 0
        for session in self.sessions:
            _unshare_reserved(session, session.offsets[self.slot], count)
        if self._remaining is None and (len(self.sessions) == 1 or count == 1):
            return super().update_and_fetch(keys, values)
        return self._ragged_update(keys, values)

    def _ragged_update(self, keys, values):
        """Several rows, several positions each (a prefill chunk), rows padded on the right."""
        sessions, slot, group = self.sessions, self.slot, self.group
        remaining = self._remaining or [keys.shape[2]] * len(sessions)
        count = self._validate_as_one(keys, values)
        reals = [min(count, r) for r in remaining]
        starts = [s.offsets[slot] for s in sessions]
        self._fetched = None
        self._reserve_rows(starts, reals)
        keys, values = self._pool_rows(keys), self._pool_rows(values)
        for row, (session, start, real) in enumerate(zip(sessions, starts, reals)):
            if real:
                self.cache.write_kv(
                    session.seqs[group], self.layer, start, keys[row, :real], values[row, :real]
                )
            session.offsets[slot] = start + real
        if self._remaining is not None:
            self._remaining = [r - real for r, real in zip(remaining, reals)]
        self._commit_finished_prompts()
        return self._fetch_to(max(starts) + count)

    def _validate_as_one(self, keys, values) -> int:
        """The shape checks of `_validate`, without its one-token-per-row rule."""
        sessions = self.sessions
        try:
            self.sessions = sessions[:1]
            count = self._validate(keys[:1], values[:1])
        finally:
            self.sessions = sessions
        if keys.shape[0] != len(sessions) or values.shape[0] != len(sessions):
            raise InvalidArgumentError(
                f"update_and_fetch got {keys.shape[0]} rows for {len(sessions)} requests."
            )
        for session in sessions:
            session._require_open()
        return count

    def _reserve_rows(self, starts, reals) -> None:
        """Reserves positions past each row's sequence, all rows and groups or none."""
        store = self.store
        growing = []
        for session, start, real in zip(self.sessions, starts, reals):
            length = store.cache.sequence_length(session.seqs[0])
            if start + real > length:
                growing.append((session, length, start + real))
        if not growing:
            return
        with store.lock:
            self._reserve_growing(growing)

    def _reserve_growing(self, growing) -> None:
        store = self.store
        size = store.config.block_size
        for g, cache in enumerate(store.groups):  # an upper bound: a partial tail may be copied
            needed = sum(
                ceil_div(end, size) - len(cache.block_table_array(s.seqs[g]))
                for s, _, end in growing
            )
            needed += sum(1 for _, length, _ in growing if length % size)
            if needed > cache.blocks_available():
                raise OutOfBlocksError(
                    f"a prefill chunk of {len(growing)} requests needs up to {needed} blocks; "
                    f"the {cache.config.num_blocks}-block pool has {cache.blocks_available()} "
                    "free or evictable. Nothing changed."
                )
        for session, length, end in growing:
            for cache, seq in zip(store.groups, session.seqs):
                cache.extend(seq, session._tokens_for(length, end))

    def _commit_finished_prompts(self) -> None:
        if not self.store.prefix_sharing:
            return
        for session in self.sessions:
            if not session.committed and min(session.offsets) >= len(session.prompt):
                for group_cache, seq in zip(self.store.groups, session.seqs):
                    group_cache.commit(seq)
                session.committed = True

    def _fetch_to(self, length: int):
        """`[B, heads, length, dim]` K/V; positions a row has not written read finite filler that
        the row's mask hides (its padding queries' outputs are discarded by mlx-lm)."""
        cfg = self.cache.config
        tables = [self.cache.block_table_array(s.seqs[self.group]) for s in self.sessions]
        tables = pad_tables(tables)
        width = ceil_div(length, cfg.block_size)
        if tables.shape[1] < width:
            tables = mx.pad(tables, [(0, 0), (0, width - tables.shape[1])])
        k_heads, k_dim, v_heads, v_dim = self.store.layer_shapes[self.slot]
        storage = self.cache.storage
        with self.cache._lock:  # never in the middle of another thread's write (see layer_cache)
            storage.settle(self.layer)  # nor before this thread's in-place decode writes
            k_pool, v_pool = storage.pools(self.layer)
        keys = gather_batch(k_pool, tables)[:, :k_heads, :length, :k_dim]
        values = gather_batch(v_pool, tables)[:, :v_heads, :length, :v_dim]
        return keys, values


def _open_now(pool: RequestPool, request: Request) -> None:
    expected = request.cached_tokens
    if pool.open_queued(request, limit=expected) != expected:
        request.close()
        raise OutOfBlocksError(
            "a queued request's cached prefix was evicted before it ran; send it again."
        )


def _unshare_reserved(request, start: int, count: int) -> None:
    """Gives a request fresh blocks for reserved, not yet written positions it shares.

    A fork made mid-prompt (mlx-lm deep-copies a prompt batch to split it) shares the blocks
    reserved for the rest of the prompt with the original. Usually the original is dropped before
    the next write; if something still holds it, the fork's unwritten positions are trimmed and
    reserved again (a partial tail is copied), so neither side writes the other's K/V."""
    if start >= len(request.prompt) or request.seqs is None or request.closed or count < 1:
        return  # past the prompt, positions are reserved as they are written (decode's hot path)
    store = request.store
    size = store.config.block_size
    for cache, seq in zip(store.groups, request.seqs):
        length = cache.sequence_length(seq)
        stop = min(start + count, length)
        if start >= stop:
            continue
        table = cache.block_table_array(seq)
        blocks = {int(table[i]) for i in range(start // size, ceil_div(stop, size))}
        # _is_writable is the backend's own test (refcount 1, not indexed).
        if all(b < 0 or cache._is_writable(b) for b in blocks):
            continue
        with store.lock:
            tokens = list(cache.tokens(seq)[start:length])
            cache.trim(seq, length - start)
            cache.extend(seq, tokens)


class BatchLayerCache(_BatchProtocol, PagedLayerCache):
    """A full-attention layer of one or more requests, with mlx-lm's batch protocol."""


class BatchWindowCache(_BatchProtocol, WindowLayerCache):
    """A sliding-window layer of one or more requests, with mlx-lm's batch protocol."""


_batch_update = _BatchProtocol.update_and_fetch.__code__
ADAPTER_CODES[id(_batch_update)] = _batch_update  # the model's frame is above it
