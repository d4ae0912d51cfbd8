"""mlx-lm adapter: per-layer cache objects over one shared paged store.

mlx-lm models call, per layer, `cache.offset` (for RoPE), `cache.update_and_fetch(keys, values)`
with post-RoPE `[B, kv_heads, L, head_dim]` (expecting the whole history back), and
`cache.make_mask(N, ...)` before the first layer. `PagedLayerCache` answers those from a
`pagedkv.mlx_backend.PagedCache` holding every request's blocks, so `mlx_lm.generate`,
`stream_generate` and `generate_step` run unchanged with `prompt_cache=session.caches`.

    store = PagedKVStore.for_model(model, num_blocks=1024)
    session = store.open(prompt_tokens)              # matches cached prefix blocks
    for out in stream_generate(model, tokenizer, session.remaining_prompt,
                               prompt_cache=session.caches, max_tokens=64):
        ...
    session.close()                                  # frees; committed prompt blocks stay cached

The store learns a request's tokens from `open(prompt_tokens)`: prompt blocks are reserved there,
written as mlx-lm prefills, and committed to the prefix index once every layer has written the
whole prompt. Generated tokens are not seen by a cache (mlx-lm feeds the model, not the cache), so
positions past the prompt are reserved under `UNKNOWN_TOKEN` and never published.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from pagedkv.config import Config
from pagedkv.errors import InvalidArgumentError, KVShapeError
from pagedkv.mlx_backend import PagedCache
from pagedkv.mlx_backend.attention import gather_batch, pad_tables

UNKNOWN_TOKEN = 2**31 - 1  # stands for generated tokens the cache never sees; never committed
_DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def model_kv_shape(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of an mlx-lm model, from its args."""
    args = model.args
    heads = args.num_attention_heads
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    return len(model.layers), kv_heads, head_dim


class PagedKVStore:
    """One paged pool for every request of a model. Not thread-safe (neither is mlx-lm's loop)."""

    def __init__(self, config: Config) -> None:
        self.cache = PagedCache(config)
        self.config = config
        self._tables_key: tuple | None = None
        self._tables: mx.array | None = None

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int = 16, dtype: str | None = None):
        """A store shaped for `model`; dtype defaults to the model's embedding dtype."""
        layers, kv_heads, head_dim = model_kv_shape(model)
        if dtype is None:
            weights = [v for _, v in tree_flatten(model.parameters())]
            dtype = _DTYPE_NAMES.get(weights[0].dtype, "float32") if weights else "float32"
        return cls(
            Config(
                num_blocks=num_blocks,
                block_size=block_size,
                num_layers=layers,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                dtype=dtype,
            )
        )

    def open(self, prompt_tokens: Sequence[int], namespace: str = "") -> Session:
        """Starts a request. The longest cached prefix of full blocks is shared; feed
        `session.remaining_prompt` to mlx-lm. Raises OutOfBlocksError, InvalidTokensError."""
        seq, cached = self.cache.add_sequence(prompt_tokens, namespace)
        return Session(self, seq, list(self.cache.tokens(seq)), cached)

    def padded_tables(self, sessions: Sequence[Session]) -> mx.array:
        """The sessions' block tables padded to one width, `[B, blocks]` int32. Tables change only
        through metadata operations, which tick the clock, so every layer of a step reuses one."""
        key = (self.cache.clock, tuple(s.seq for s in sessions))
        if self._tables_key != key:
            tables = [self.cache.block_table_array(s.seq) for s in sessions]
            self._tables_key, self._tables = key, pad_tables(tables)
        return self._tables

    def batch(self, sessions: Sequence[Session]) -> list[PagedLayerCache]:
        """Per-layer caches over several sessions, for batched decoding (ragged lengths): each
        model call feeds one token per session. Prefill through each session's own caches."""
        if not sessions or len({id(s) for s in sessions}) != len(sessions):
            raise InvalidArgumentError("batch needs one or more distinct open sessions.")
        for session in sessions:
            session._require_open()
        return [
            PagedLayerCache(self, layer, list(sessions)) for layer in range(self.config.num_layers)
        ]


class Session:
    """One request: its sequence in the store, its prompt, and how far each layer has written."""

    def __init__(self, store: PagedKVStore, seq: int, prompt: list[int], cached: int) -> None:
        self.store = store
        self.seq = seq
        self.prompt = prompt
        self.cached_tokens = cached
        self.offsets = [cached] * store.config.num_layers
        self.committed = False
        self.closed = False
        self.caches = [
            PagedLayerCache(store, layer, [self]) for layer in range(store.config.num_layers)
        ]

    @property
    def remaining_prompt(self) -> list[int]:
        """The prompt tokens the model must still prefill (never empty: rule 3)."""
        return self.prompt[self.cached_tokens :]

    def _require_open(self) -> None:
        if self.closed:
            raise InvalidArgumentError(f"session of sequence {self.seq} is closed.")

    def _tokens_for(self, start: int, stop: int) -> list[int]:
        known = self.prompt[start:stop]
        return known + [UNKNOWN_TOKEN] * (stop - start - len(known))

    def _sync_length(self) -> None:
        """Trims the stored sequence to the furthest layer once every layer has trimmed. Prompt
        tokens past the new end are forgotten: whatever is fed there next is not known to be them."""
        furthest = max(self.offsets)
        length = self.store.cache.sequence_length(self.seq)
        if furthest < length:
            self.store.cache.trim(self.seq, length - furthest)
        del self.prompt[furthest:]

    def close(self) -> None:
        """Frees the sequence; its committed prompt blocks stay cached for later requests."""
        if not self.closed:
            self.store.cache.free(self.seq)
            self.closed = True


class PagedLayerCache:
    """mlx-lm's cache protocol for one layer of one or more sessions."""

    def __init__(self, store: PagedKVStore, layer: int, sessions: list[Session]) -> None:
        self.store = store
        self.layer = layer
        self.sessions = sessions

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
        dtype = cache.storage.dtype
        keys = keys.transpose(0, 2, 1, 3).astype(dtype)  # [B, L, kv_heads, head_dim]
        values = values.transpose(0, 2, 1, 3).astype(dtype)
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
        return self._fetch()

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
        return mask[:, None] if len(offsets) > 1 else mask[0]

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
