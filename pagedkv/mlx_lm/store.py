"""The store: one paged pool for every request of a model, laid out from the model's own caches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from pagedkv.config import Config
from pagedkv.errors import InvalidArgumentError, UnsupportedModelError
from pagedkv.mlx_backend import PagedCache
from pagedkv.mlx_backend.attention import pad_tables
from pagedkv.mlx_lm.kinds import FULL, RECURRENT, SHARED, WINDOW, classify_all, default_caches
from pagedkv.mlx_lm.layer_cache import PagedLayerCache
from pagedkv.mlx_lm.probe import ragged_batch_is_exact
from pagedkv.mlx_lm.session import Session
from pagedkv.mlx_lm.shapes import LayerShape, discover_shapes
from pagedkv.mlx_lm.window import WindowLayerCache

UNUSED = "unused"  # a K/V entry the model never updates (e.g. nemotron-nas no-op attention)


@dataclass(frozen=True)
class Entry:
    """One entry of the session's cache list: its kind, and its pool layer when it is paged."""

    kind: str
    layer: int | None = None
    window: int | None = None


class PagedKVStore:
    """One paged pool for every request of a model. Not thread-safe (neither is mlx-lm's loop).

    `PagedKVStore(config)` pages `config.num_layers` full-attention layers (llama-style models);
    `PagedKVStore.for_model(model, ...)` lays the store out from the model's own `make_cache()`.
    """

    def __init__(
        self, config: Config, entries=None, shapes=None, make_cache=None, model=None
    ) -> None:
        self.cache = PagedCache(config)
        self.config = config
        self.entries: list[Entry] = entries or [Entry(FULL, i) for i in range(config.num_layers)]
        head = (config.num_kv_heads, config.head_dim, config.num_kv_heads, config.head_dim)
        # Per pool layer: (k_heads, k_dim, v_heads, v_dim); smaller layers are zero-padded.
        self.layer_shapes: list[tuple[int, int, int, int]] = shapes or [head] * config.num_layers
        self._make_cache = make_cache
        self._model = model  # for_model stores only: the ragged-batch probe runs it once
        self._batch_exact: bool | None = None if model is not None else True
        # A recurrent state cannot be shared block by block: hybrids never publish prefixes.
        self.prefix_sharing = not any(e.kind == RECURRENT for e in self.entries)
        self._tables_key: tuple | None = None
        self._tables: mx.array | None = None

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int = 16, dtype: str | None = None):
        """A store laid out for `model`, or UnsupportedModelError naming what cannot run exactly.

        Cache kinds come from `model.make_cache()` (kinds.py); K/V shapes and the pool dtype (the
        model's activation dtype, so a quantized model gets its float16/bfloat16 pool) from one
        recorded forward pass (shapes.py). Pass `dtype` to store K/V in another dtype (lossy).
        """
        entries = default_caches(model)
        kinds = classify_all(entries)
        shapes = discover_shapes(model, entries, kinds)
        layout, pool_shapes = [], []
        for kind, shape in zip(kinds, shapes):
            if kind.paged and shape is None:
                layout.append(Entry(UNUSED))
            elif kind.paged:
                layout.append(Entry(kind.kind, len(pool_shapes), kind.window))
                pool_shapes.append(shape)
            else:
                layout.append(Entry(kind.kind))
        if not pool_shapes:
            raise UnsupportedModelError("the model never updates a K/V cache; nothing to page.")
        dtypes = {s.dtype for s in pool_shapes}
        if len(dtypes) > 1:
            raise UnsupportedModelError(
                f"the model's K/V caches receive several dtypes {sorted(dtypes)}; one pool "
                "holds one dtype. Cast the model to one dtype first."
            )
        config = Config(
            num_blocks=num_blocks,
            block_size=block_size,
            num_layers=len(pool_shapes),
            num_kv_heads=max(max(s.k_heads, s.v_heads) for s in pool_shapes),
            head_dim=max(max(s.k_dim, s.v_dim) for s in pool_shapes),
            dtype=dtype if dtype is not None else dtypes.pop(),
        )
        make_cache = (
            (lambda: default_caches(model))
            if any(e.kind in (RECURRENT, UNUSED) for e in layout)
            else None
        )
        return cls(config, layout, [_dims(s) for s in pool_shapes], make_cache, model)

    def open(self, prompt_tokens: Sequence[int], namespace: str = "") -> Session:
        """Starts a request. The longest cached prefix of full blocks is shared (never for hybrid
        models); feed `session.remaining_prompt` to mlx-lm. Raises OutOfBlocksError,
        InvalidTokensError."""
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

    def caches_for(self, sessions: list[Session]) -> list:
        """The cache list the model gets for these sessions, one object per `make_cache()` entry."""
        own = self._make_cache() if self._make_cache is not None else None
        caches = []
        for i, entry in enumerate(self.entries):
            if entry.kind == FULL:
                caches.append(PagedLayerCache(self, entry.layer, sessions))
            elif entry.kind == WINDOW:
                caches.append(WindowLayerCache(self, entry.layer, sessions, entry.window))
            elif entry.kind == SHARED:
                caches.append(None)
            else:  # recurrent state or an unused entry: mlx-lm's own object, per session
                caches.append(own[i])
        return caches

    def batch(self, sessions: Sequence[Session]) -> list:
        """Per-layer caches over several sessions, for batched decoding (ragged lengths): each
        model call feeds one token per session. Prefill through each session's own caches."""
        sessions = list(sessions) if not isinstance(sessions, Session) else [sessions]
        if not sessions or len({id(s) for s in sessions}) != len(sessions):
            raise InvalidArgumentError("batch needs one or more distinct open sessions.")
        for session in sessions:
            if not isinstance(session, Session) or session.store is not self:
                raise InvalidArgumentError(
                    f"batch got {session!r}, which is not a session of this store; open "
                    "sessions with store.open()."
                )
            session._require_open()
        if not self.prefix_sharing:
            raise UnsupportedModelError(
                "batch: this model keeps recurrent state (a hybrid), which pagedkv does not "
                "merge across sessions; decode each session through its own session.caches."
            )
        if self._batch_exact is None:
            self._batch_exact = ragged_batch_is_exact(self, self._model)
        if not self._batch_exact:
            raise UnsupportedModelError(
                "batch: this model decodes a ragged batch differently from each request alone "
                "(it takes positions from the key length, not cache.offset); decode each "
                "session through its own session.caches."
            )
        return self.caches_for(sessions)


def _dims(shape: LayerShape) -> tuple[int, int, int, int]:
    return (shape.k_heads, shape.k_dim, shape.v_heads, shape.v_dim)
