"""The paged prompt cache: what mlx-lm's server asks of its `LRUPromptCache`, from the store's trie.

mlx-lm's server keeps whole per-request caches in an LRU and deep-copies one on every hit. Here
the store's prefix index is the cache: `fetch_nearest_cache` opens a request that shares every
cached full block of the prompt (no copy), and `insert_cache` teaches the store the tokens a
finished request generated, so their full blocks are published and the next chat turn, whose
prompt repeats the reply, hits them. The cache objects themselves are never kept: dropping them
returns the request's blocks to the pool (cached blocks stay until evicted).

Everything here runs on the server's generation thread, like the rest of mlx-lm's loop (MLX
streams are per thread); the store is built there, on the first request, from the loaded model.
"""

from __future__ import annotations

import logging

from pagedkv.errors import OutOfBlocksError, UnsupportedModelError
from pagedkv.mlx_lm.admission import Admission
from pagedkv.mlx_lm.batch import BatchLayerCache, Request, RequestPool
from pagedkv.mlx_lm.session import UNKNOWN_TOKEN
from pagedkv.mlx_lm.store import PagedKVStore

log = logging.getLogger("pagedkv.serve")


class PagedPromptCache:
    """`LRUPromptCache`'s interface over one paged store per loaded model.

    Args:
        model_of: returns the loaded model for a model key (the server's ModelProvider.model).
        num_blocks, block_size: the store's pools (per attention group).
    """

    def __init__(self, model_of, num_blocks: int, block_size: int = 16) -> None:
        self._model_of = model_of
        self.num_blocks, self.block_size = num_blocks, block_size
        self.model_key = None
        self.store: PagedKVStore | None = None
        self.pool: RequestPool | None = None
        self.admission: Admission | None = None
        self.counts = dict(
            requests=0, unpaged=0, hit_tokens=0, learned_tokens=0, inserts=0, refused=0
        )

    # -- LRUPromptCache's interface ------------------------------------------------------------

    def fetch_nearest_cache(self, model_key, tokens):
        """(cache list, tokens still to prefill). The cache list is always paged for a model the
        store can run; (None, tokens) makes mlx-lm use its own caches (models it cannot)."""
        pool = self._pool_for(model_key)
        self.counts["requests"] += 1
        if pool is None:
            self.counts["unpaged"] += 1
            return None, list(tokens)
        request = self.admission.open(list(tokens))
        self.counts["hit_tokens"] += request.cached_tokens
        return pool.caches([request]), list(tokens[request.cached_tokens :])

    def insert_cache(self, model_key, tokens, prompt_cache, *, cache_type: str = "assistant"):
        """Learns the tokens the cache holds past its prompt (a reply) and publishes their full
        blocks. Caches that are not this store's (mlx-lm's own) are ignored: not kept."""
        request = _request_of(prompt_cache)
        if request is None or request.pool is not self.pool or request.closed:
            return
        for cache in prompt_cache:  # the cache is ours now: the caller's list holds nothing more
            if hasattr(cache, "_remaining"):
                cache.sessions = []
        self.counts["inserts"] += 1
        written = min(request.offsets)
        tokens = list(tokens)[:written]
        prompt = request.prompt
        if written < len(prompt) or tokens[: len(prompt)] != prompt:
            return  # mid-prompt (a segment end): the prompt is published when it completes
        with self.store.lock:
            learned = _learn(self.store, request, tokens)
            if self.store.prefix_sharing:
                for cache, seq in zip(self.store.groups, request.seqs):
                    cache.commit(seq)
        self.counts["learned_tokens"] += learned

    def trim_to(self, *, n_sequences=None, n_bytes=None) -> None:
        """Evicts cached (unreferenced) blocks until the cached bytes are at most `n_bytes`."""
        if self.store is None or n_bytes is None:
            return
        for cache in self.store.groups:
            per_block = cache.config.bytes_per_block
            excess = cache.stats().cached_blocks - max(0, n_bytes) // per_block
            if excess > 0:
                cache.evict(excess)

    def __len__(self) -> int:
        """Cached blocks (published, held by no request), every group."""
        if self.store is None:
            return 0
        return sum(cache.stats().cached_blocks for cache in self.store.groups)

    @property
    def nbytes(self) -> int:
        if self.store is None:
            return 0
        return sum(c.stats().cached_blocks * c.config.bytes_per_block for c in self.store.groups)

    def stats_by_type(self) -> dict:
        """What the server logs per cache type: here one type, the paged blocks."""
        out = {"paged-cached": {"n_sequences": len(self), "n_bytes": self.nbytes}}
        if self.store is not None:
            held = self.pool.held_blocks()
            per_block = self.store.config.bytes_per_block
            out["paged-in-use"] = {"n_sequences": held, "n_bytes": held * per_block}
        return out

    # -- pagedkv's own ---------------------------------------------------------------------------

    def counters(self) -> dict:
        """The counters only (requests, hits, learned tokens, admission, live requests): safe to
        read from any thread, changes nothing."""
        out = dict(self.counts)
        if self.pool is not None:
            pool = self.pool
            out["live_requests"] = pool.opened - pool.released - len(pool._dropped)
            out.update(self.admission.counts)
            # refused before admission (the server's prompt check) and by admission itself
            out["refused"] = self.counts["refused"] + self.admission.counts["refused"]
        return out

    def stats(self) -> dict:
        """`counters()` and the full-attention pool's blocks (free, cached, in use), after
        freeing dropped requests. It touches the store: call it on the server's generation
        thread, or while no request is live (`counters()["live_requests"] == 0`)."""
        if self.store is None:
            return self.counters()
        self.pool.reap()
        out = self.counters()
        stats = self.store.cache.stats()
        out.update(
            free_blocks=stats.free_blocks,
            cached_blocks=stats.cached_blocks,
            in_use_blocks=stats.in_use_blocks,
        )
        return out

    def _pool_for(self, model_key) -> RequestPool | None:
        if model_key != self.model_key:
            if self.store is not None:
                self.store.close()
            self.model_key, self.store, self.pool, self.admission = model_key, None, None, None
            try:
                self.store = PagedKVStore.for_model(
                    self._model_of(model_key), self.num_blocks, self.block_size
                )
                self.pool = RequestPool(self.store)
                self.admission = Admission(self.pool)
            except UnsupportedModelError as error:
                log.warning("pagedkv: serving %s with mlx-lm's own caches: %s", model_key, error)
                self.store = self.pool = None
        return self.pool


def _request_of(prompt_cache) -> Request | None:
    for cache in prompt_cache or ():
        if isinstance(cache, BatchLayerCache) or hasattr(cache, "_remaining"):
            if len(cache.sessions) == 1 and isinstance(cache.sessions[0], Request):
                return cache.sessions[0]
    return None


def _learn(store, request: Request, tokens: list[int]) -> int:
    """Writes the tokens of positions the store reserved as UNKNOWN_TOKEN (generated tokens mlx-lm
    fed the model) into every group's sequence and the request's prompt; returns how many.

    Only positions past the prompt change, and only from UNKNOWN_TOKEN: none of them is in the
    prefix index yet (rule: only committed full blocks are), so no published key changes."""
    start = len(request.prompt)
    if len(tokens) <= start:
        return 0
    for cache, seq in zip(store.groups, request.seqs):
        held = cache._sequence(seq).tokens  # the backend's own list: no public setter exists yet
        if len(held) < len(tokens) or any(t != UNKNOWN_TOKEN for t in held[start : len(tokens)]):
            return 0
    for cache, seq in zip(store.groups, request.seqs):
        cache._sequence(seq).tokens[start : len(tokens)] = tokens[start:]
    request.prompt.extend(tokens[start:])
    return len(tokens) - start


__all__ = ["OutOfBlocksError", "PagedPromptCache"]
