"""The store: one paged pool for every request of a model, shaped from the model."""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from pagedkv.config import Config
from pagedkv.errors import InvalidArgumentError
from pagedkv.mlx_backend import PagedCache
from pagedkv.mlx_backend.attention import decode_batch, pad_tables
from pagedkv.mlx_backend.kernels.decode import DecodeBatch
from pagedkv.mlx_lm import routing
from pagedkv.mlx_lm.layer_cache import PagedLayerCache
from pagedkv.mlx_lm.session import Session

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
        self._batch_key: tuple | None = None
        self._batch: DecodeBatch | None = None
        self._masks: deque[tuple[mx.array, int | None]] = deque(maxlen=8)  # made by make_mask
        self._routed_modules: list[str] = []
        self._unroute = None
        self.routed_calls = 0  # decode attention calls answered in place (see routing)

    @classmethod
    def for_model(
        cls,
        model,
        num_blocks: int,
        block_size: int = 16,
        dtype: str | None = None,
        route_attention: bool = True,
    ):
        """A store shaped for `model`; dtype defaults to the model's embedding dtype. With
        `route_attention` (default) the model's decode attention runs in place on the paged pools
        (see `pagedkv.mlx_lm.routing`) until `close()` or the store is dropped."""
        layers, kv_heads, head_dim = model_kv_shape(model)
        if dtype is None:
            weights = [v for _, v in tree_flatten(model.parameters())]
            dtype = _DTYPE_NAMES.get(weights[0].dtype, "float32") if weights else "float32"
        store = cls(
            Config(
                num_blocks=num_blocks,
                block_size=block_size,
                num_layers=layers,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                dtype=dtype,
            )
        )
        if route_attention:
            store.route(model)
        return store

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

    def route(self, model) -> None:
        """Routes `model`'s decode attention to the paged kernel (reversed by `close`)."""
        if self._unroute is None:
            self._routed_modules = routing.route(model)
            self._unroute = weakref.finalize(self, routing.unroute, self._routed_modules)

    @property
    def routes_attention(self) -> bool:
        """Whether this store's caches answer the model's decode attention in place."""
        return self._unroute is not None

    def close(self) -> None:
        """Gives the model its own attention helper back (sessions stay usable, via gather)."""
        if self._unroute is not None:
            self._unroute()
            self._unroute = None

    def decode_batch(self, sessions: Sequence[Session], layer: int, window: int | None):
        """Kernel inputs for one decode step (tables, bounds, longest), shared by every layer."""
        lengths = tuple(s.offsets[layer] for s in sessions)
        key = (self.cache.clock, tuple(s.seq for s in sessions), lengths, window)
        if self._batch_key != key:
            tables = [self.cache.block_table_array(s.seq) for s in sessions]
            self._batch_key, self._batch = key, decode_batch(tables, list(lengths), window)
        return self._batch

    def remember_mask(self, mask: mx.array, window: int | None) -> None:
        """Records a mask that make_mask returned, so routed attention knows what it means."""
        self._masks.append((mask, window))

    def mask_window(self, mask) -> tuple[bool, int | None]:
        """(known, window) of a mask passed to attention: None means every key is visible."""
        if mask is None:
            return True, None
        for made, window in self._masks:
            if made is mask:
                return True, window
        return False, None

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
