"""The store: paged pools for every request of a model, laid out from the model's own caches."""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import mlx.core as mx

from pagedkv.config import Config
from pagedkv.errors import (
    InvalidArgumentError,
    InvalidTokensError,
    OutOfBlocksError,
    UnsupportedModelError,
)
from pagedkv.mlx_backend import PagedCache
from pagedkv.mlx_backend.attention import pad_tables
from pagedkv.mlx_backend.kernels import write
from pagedkv.mlx_lm import callers, routing
from pagedkv.mlx_lm.kinds import FULL, RECURRENT, SHARED, WINDOW, classify_all, default_caches
from pagedkv.mlx_lm.layer_cache import PagedLayerCache
from pagedkv.mlx_lm.probe import ragged_batch_is_exact
from pagedkv.mlx_lm.session import Session
from pagedkv.mlx_lm.shapes import LayerShape, discover_shapes
from pagedkv.mlx_lm.step import DecodeStep
from pagedkv.mlx_lm.window import WindowLayerCache

STEP_WAIT_S = 30.0  # how long a new thread waits for the owner's step in flight (see enter)
UNUSED = "unused"  # a K/V entry the model never updates (e.g. nemotron-nas linear attention)


@dataclass(frozen=True)
class Entry:
    """One entry of the session's cache list: its kind, and for a paged entry its group (which of
    the store's caches) and its layer in that cache's pool."""

    kind: str
    layer: int | None = None
    window: int | None = None
    group: int = 0


class PagedKVStore:
    """Paged pools for every request of a model. Threads may share a store (each cache runs one
    call at a time and its K/V may be used from any thread); a session, like mlx-lm's own caches,
    belongs to one thread at a time.

    Layers are grouped by attention span: the full-attention layers share one `PagedCache`, and
    the layers of each sliding-window size share another whose `Config.window` releases blocks
    that fall before the window (rule 10), so their memory stays bounded. A session holds one
    sequence in each group's cache; they advance, commit, trim and free together, all or nothing.

    `PagedKVStore(config)` pages `config.num_layers` layers (full attention, or sliding-window
    layers when `config.window` is set); `PagedKVStore.for_model(model, ...)` lays the store out
    from the model's own `make_cache()`. `store.cache` and `store.config` are the first group's.
    """

    def __init__(self, config, entries=None, shapes=None, make_cache=None, model=None) -> None:
        # PAGEDKV_DECODE_WRITES, read (and refused if unknown: ConfigError) before anything is made
        self.in_place_writes = write.setting() == "auto"
        configs = [config] if isinstance(config, Config) else list(config)
        self.groups = [PagedCache(c) for c in configs]
        # Held across the groups' check-then-change steps (open, reserve), so that a thread
        # sharing the store cannot take a group's blocks between another's check and its change.
        self.lock = threading.RLock()
        self.cache, self.config = self.groups[0], configs[0]
        kind = FULL if self.config.window is None else WINDOW
        self.entries: list[Entry] = entries or [
            Entry(kind, i, self.config.window) for i in range(self.config.num_layers)
        ]
        # Slots number the paged layers group by group: session.offsets[slot], layer_shapes[slot].
        paged = sorted((e.group, e.layer) for e in self.entries if e.kind in (FULL, WINDOW))
        self.slot_of = {key: slot for slot, key in enumerate(paged)}
        head = (self.config.num_kv_heads, self.config.head_dim) * 2
        # Per slot: (k_heads, k_dim, v_heads, v_dim); layers smaller than the pool are zero-padded.
        self.layer_shapes: list[tuple[int, int, int, int]] = shapes or [head] * len(paged)
        self._make_cache = make_cache
        self._model = model  # for_model stores only: the ragged-batch probe runs it once
        self._batch_exact: bool | None = None if model is not None else True
        # A recurrent state cannot be shared block by block: hybrids never publish prefixes.
        self.prefix_sharing = not any(e.kind == RECURRENT for e in self.entries)
        # (key, value) pairs, each replaced in one assignment: threads sharing the store never
        # see one step's key with another step's value
        self._tables: tuple = (None, None)
        # The batch's offsets as one array, (offsets, array): every layer of a step reads the
        # same ones (mlx-lm's rope takes them), so one array serves them all. One assignment.
        self._offsets: tuple = (None, None)
        # Per group, the decode step its layers are writing (mlx_lm/step.py): one assignment each.
        self.steps: list[DecodeStep | None] = [None] * len(self.groups)
        # Scheduling of decode writes (see `enter`): the one thread using the store leaves the
        # later layers' writes of a step lazy and schedules them once per step, by group.
        self.owner: int | None = None  # the first thread to use the store
        self.shared = False  # a second thread has used it: every write is scheduled at once
        self.pending: dict[int, list[int]] = {}  # group -> layers the owner wrote, unscheduled
        self._scheduled = threading.Condition(self.lock)
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
        """A store laid out for `model`, or UnsupportedModelError naming what cannot run exactly.

        Cache kinds come from `model.make_cache()` (kinds.py); K/V shapes and the pool dtype (the
        model's activation dtype, so a quantized model gets its float16/bfloat16 pool) from one
        recorded forward pass (shapes.py). Each group (the full-attention layers; the layers of
        each window size) gets a pool of `num_blocks` blocks. Pass `dtype` to store K/V in another
        dtype (lossy). With `route_attention` (default) the model's decode attention runs in place
        on the paged pools (see `pagedkv.mlx_lm.routing`) until `close()` or the store is dropped.
        """
        entries = default_caches(model)
        kinds = classify_all(entries)
        shapes = discover_shapes(model, entries, kinds)
        layout, groups = [], {}  # groups: window (None for full attention) -> member shapes
        for kind, shape in zip(kinds, shapes):
            if kind.paged and shape is None:
                layout.append(Entry(UNUSED))
            elif kind.paged:
                members = groups.setdefault(kind.window, [])
                layout.append(Entry(kind.kind, len(members), kind.window))
                members.append(shape)
            else:
                layout.append(Entry(kind.kind))
        if not groups:
            raise UnsupportedModelError("the model never updates a K/V cache; nothing to page.")
        # Full attention first (store.cache), then windows from the narrowest.
        groups = {w: groups[w] for w in sorted(groups, key=lambda w: (w is not None, w or 0))}
        order = list(groups)
        layout = [
            replace(e, group=order.index(e.window)) if e.layer is not None else e for e in layout
        ]
        dtypes = {s.dtype for members in groups.values() for s in members}
        if len(dtypes) > 1:
            raise UnsupportedModelError(
                f"the model's K/V caches receive several dtypes {sorted(dtypes)}; one pool "
                "holds one dtype. Cast the model to one dtype first."
            )
        dtype = dtype if dtype is not None else dtypes.pop()
        configs = [
            Config(
                num_blocks=num_blocks,
                block_size=block_size,
                num_layers=len(members),
                num_kv_heads=max(max(s.k_heads, s.v_heads) for s in members),
                head_dim=max(max(s.k_dim, s.v_dim) for s in members),
                dtype=dtype,
                window=window,
            )
            for window, members in groups.items()
        ]
        slot_shapes = [_dims(s) for members in groups.values() for s in members]
        own = any(e.kind in (RECURRENT, UNUSED) for e in layout)
        make_cache = (lambda: default_caches(model)) if own else None
        store = cls(configs, layout, slot_shapes, make_cache, model)
        if route_attention:
            store.route(model)
        return store

    def open(self, prompt_tokens: Sequence[int], namespace: str = "") -> Session:
        """Starts a request. The longest cached prefix of full blocks is shared (never for hybrid
        models); feed `session.remaining_prompt` to mlx-lm. prompt_tokens: a token sequence as the
        cache takes it (`pagedkv.spec.checks`), or a 1-D integer mx.array. Raises
        OutOfBlocksError, InvalidTokensError, InvalidArgumentError; nothing changes then."""
        if isinstance(prompt_tokens, mx.array) and prompt_tokens.ndim == 1:
            if not mx.issubdtype(prompt_tokens.dtype, mx.integer):
                raise InvalidTokensError(f"prompt tokens of dtype {prompt_tokens.dtype}: not ids.")
            prompt_tokens = prompt_tokens.tolist()
        self.enter()
        with self.lock:
            return self._open(prompt_tokens, namespace)

    def _open(self, prompt_tokens, namespace: str) -> Session:
        if len(self.groups) == 1:
            seq, cached = self.cache.add_sequence(prompt_tokens, namespace)
            return Session(self, [seq], list(self.cache.tokens(seq)), cached)
        # Every group shares one prefix: the shortest of their matches (their evictions differ).
        cap = min(cache.prefix_match(prompt_tokens, namespace) for cache in self.groups)
        for cache in self.groups:  # every group is checked before any changes
            if not cache.can_add_sequence(prompt_tokens, namespace, cap):
                raise OutOfBlocksError(
                    f"open({len(prompt_tokens)} tokens): the {cache.config.num_blocks}-block "
                    f"pool of the {_group_name(cache)} layers cannot hold it; nothing changed. "
                    "Close sessions or use more blocks."
                )
        added = [cache.add_sequence(prompt_tokens, namespace, cap) for cache in self.groups]
        seqs = [seq for seq, _ in added]
        return Session(self, seqs, list(self.cache.tokens(seqs[0])), added[0][1])

    def enter(self) -> None:
        """Called by the operations that may touch the pools (open, a step's first layer, close):
        no thread builds on another thread's unscheduled writes.

        MLX records work lazily on the calling thread's stream, and only that thread can
        evaluate it. While one thread (the owner) uses the store, a decode step's later layers
        write lazily and the step's last layer schedules them all, one `mx.async_eval` per group
        and step. (One per write cost an H100 twice the host time of a batch-8 step.) The first
        time another thread comes, the store becomes shared for good: every write is scheduled
        at once, and the newcomer waits until the owner's step in flight, if any, is scheduled
        (its next write does it). Raises InvalidArgumentError, changing nothing, if that takes
        over STEP_WAIT_S: the owner left a step half-way (an error inside the model); the owner's
        next operation on the store schedules it."""
        me = threading.get_ident()
        if me == self.owner:
            if self.pending:  # a step left half-way: schedule what it wrote
                self.schedule_pending()
            return
        if self.shared and not self.pending:
            return
        with self._scheduled:
            if self.owner is None:
                self.owner = me
                return
            self.shared = True
            if not self._scheduled.wait_for(lambda: not self.pending, timeout=STEP_WAIT_S):
                raise InvalidArgumentError(
                    "another thread left a decode step of this store half-way; its K/V writes "
                    "are unscheduled on that thread's MLX stream. Finish or close that thread's "
                    "session (on that thread) first; nothing changed."
                )

    def schedule_pending(self) -> None:
        """The owner schedules its lazily written layers (every group) and wakes waiting threads.
        Only the owner calls this: MLX refuses to evaluate another thread's work."""
        with self._scheduled:
            # Handing over to another thread, the writes are also completed: a thread cannot
            # wait for work still running on another thread's stream (MLX raises "There is no
            # Stream ... in current thread"). Alone, scheduling keeps the device pipelined.
            run = mx.eval if self.shared else mx.async_eval
            for group, layers in self.pending.items():
                cache = self.groups[group]
                with cache._lock:
                    storage = cache.storage
                    pools = [storage.pools(i) for i in layers]
                    writes = [storage.unsettled[i] for i in layers if i in storage.unsettled]
                    run(pools, writes)  # writes: the layers written in place
            self.pending.clear()
            self._scheduled.notify_all()

    def padded_tables(self, sessions: Sequence[Session], group: int = 0) -> mx.array:
        """The sessions' block tables in one group's cache, padded to one width, `[B, blocks]`
        int32 (holes a window released read block 0, masked). Tables change only through
        metadata operations, which tick the clock, so every layer of a step reuses one."""
        cache = self.groups[group]
        key = (group, cache.clock, tuple(s.seqs[group] for s in sessions))
        cached_key, tables = self._tables
        if cached_key != key:
            tables = pad_tables([cache.block_table_array(s.seqs[group]) for s in sessions])
            self._tables = (key, tables)
        return tables

    def route(self, model) -> None:
        """Routes `model`'s decode attention to the paged kernel (reversed by `close`)."""
        if self._unroute is None:
            self._routed_modules = routing.route(model)
            self._unroute = weakref.finalize(self, routing.unroute, self._routed_modules)
            callers.prove_model(model)  # now, not in the first decode step

    @property
    def routes_attention(self) -> bool:
        """Whether this store's caches answer the model's decode attention in place."""
        return self._unroute is not None

    def close(self) -> None:
        """Gives the model its own attention helper back (sessions stay usable, via gather)."""
        if self._unroute is not None:
            self._unroute()
            self._unroute = None

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

    def check_invariants(self) -> None:
        """Every group's cache checks its invariants; sessions' sequences agree across groups."""
        for cache in self.groups:
            cache.check_invariants()

    def caches_for(self, sessions: list[Session]) -> list:
        """The cache list the model gets for these sessions, one object per `make_cache()` entry."""
        own = self._make_cache() if self._make_cache is not None else None
        caches = []
        for i, entry in enumerate(self.entries):
            if entry.kind == FULL:
                caches.append(PagedLayerCache(self, entry.layer, sessions, entry.group))
            elif entry.kind == WINDOW:
                window = WindowLayerCache(self, entry.layer, sessions, entry.window, entry.group)
                caches.append(window)
            elif entry.kind == SHARED:
                caches.append(None)
            else:  # recurrent state or an unused entry: mlx-lm's own object, per session
                caches.append(own[i])
        return caches

    def batch(self, sessions: Sequence[Session]) -> list:
        """Per-layer caches over several sessions, for batched decoding (ragged lengths): each
        model call feeds one token per session. Prefill through each session's own caches."""
        if not isinstance(sessions, (list, tuple, Session)):
            raise InvalidArgumentError(
                f"batch needs a list of open sessions, got {type(sessions).__name__}."
            )
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
        self.require_batchable("batch", "decode each session through its own session.caches")
        return self.caches_for(sessions)

    def require_batchable(self, what: str, instead: str) -> None:
        """Raises UnsupportedModelError (naming `what` and what to do `instead`) unless this
        model's requests can share one batch: no recurrent layers, and a ragged batch decodes
        exactly as each request alone (probed once, on a scratch pool)."""
        if not self.prefix_sharing:
            raise UnsupportedModelError(
                f"{what}: this model keeps recurrent state (a hybrid), which pagedkv does not "
                f"merge across requests; {instead}."
            )
        if self._batch_exact is None:
            self._batch_exact = ragged_batch_is_exact(self, self._model)
        if not self._batch_exact:
            raise UnsupportedModelError(
                f"{what}: this model decodes a ragged batch differently from each request alone "
                f"(it takes positions from the key length, not cache.offset); {instead}."
            )


def _group_name(cache) -> str:
    window = cache.config.window
    return "full-attention" if window is None else f"window-{window}"


def _dims(shape: LayerShape) -> tuple[int, int, int, int]:
    return (shape.k_heads, shape.k_dim, shape.v_heads, shape.v_dim)
