"""The K/V half of `PagedCache`: writing rows into reserved blocks, reading them back, attention.

`PagedCache` (in `cache.py`) holds the metadata rules; this mixin adds the operations that touch
the stored K/V, with the same checks-before-changes discipline (rule 7) and the same contract
style (see `PagedCache`). None of them ticks the clock (D1); `write_kv` never allocates (D3: the
blocks were reserved by `add_sequence` / `extend`, rule 2). Rules and decisions are numbered in
`pagedkv.spec.rules`.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from typing import TYPE_CHECKING

import numpy as np

from pagedkv import errors
from pagedkv.spec import checks
from pagedkv.spec.attention import reference_attention
from pagedkv.spec.storage import NUMPY_STORAGE_DTYPE, KVStorage, to_float32
from pagedkv.spec.window import HOLE, leading_holes

if TYPE_CHECKING:
    from pagedkv.spec.sequence import Sequence


class KVOperations:
    """The K/V operations of `PagedCache` (a mixin: expects `config`, `storage`, `pool`,
    `_sequence` and `_is_writable`)."""

    # ---- write ---------------------------------------------------------------------------------

    def _require_storage(self, asked: str) -> KVStorage:
        if self.storage is None:
            raise errors.storage_disabled(asked)
        return self.storage

    def write_kv(
        self, seq_id: int, layer: int, start: int, keys: np.ndarray, values: np.ndarray
    ) -> None:
        """Stores K/V rows for positions [start, start + n) of a sequence in one layer (rule 2).

        Requires:
            K/V storage (`Config.store_kv`); a live handle; `layer` in [0, num_layers); `start` a
            count; `keys` and `values` `[n >= 1, kv_heads, head_dim]` of the cache's dtype (bfloat16
            as uint16 bits); start + n <= len; every touched block held and writable (rule 1):
            positions served by the prefix index or shared by a fork already hold their K/V.

        Effects:
            The rows of that layer only. No tick (D1), no allocation (D3), no stats.

        Raises:
            StorageDisabledError: the cache is metadata-only.
            UnknownSequenceError: `seq_id` is not a live handle.
            InvalidArgumentError: `layer` out of range, or `start` not a count.
            KVDtypeError: `keys` or `values` is not an array of the cache's dtype.
            KVShapeError: a shape other than `[n >= 1, kv_heads, head_dim]`, or keys and values
                differ.
            InvalidPositionError: start + n is past the sequence's length.
            NotWritableError: a touched block is released by the window (D10), shared or indexed
                (rule 1).
        """
        storage = self._require_storage("write_kv")
        layer, blocks, rows = self._check_write(self._sequence(seq_id), layer, start, keys, values)
        storage.write_rows(layer, blocks, rows, keys, values)

    def _check_write(
        self, seq: Sequence, layer: int, start: int, keys: np.ndarray, values: np.ndarray
    ) -> tuple[int, np.ndarray, np.ndarray]:
        """Validates one sequence's write; returns (layer, block of each row, row in its block)."""
        cfg = self.config
        layer = checks.as_layer(layer, cfg.num_layers)
        start = checks.as_count(start, "start")
        count = checks.check_kv(
            keys, values, NUMPY_STORAGE_DTYPE[cfg.dtype], cfg.dtype, cfg.num_kv_heads, cfg.head_dim
        )
        if start + count > len(seq.tokens):
            raise errors.write_past_end(start, count, seq.id, len(seq.tokens))
        positions = np.arange(start, start + count)
        blocks = np.array(seq.table)[positions // cfg.block_size]
        for block in dict.fromkeys(blocks.tolist()):  # each touched block, in position order
            if block == HOLE:  # holes lead the table: the first touched position is released
                raise errors.write_released(start, seq.id)
            if not self._is_writable(block):
                raise errors.write_shared(block, seq.id, self.pool.refcounts[block])
        return layer, blocks, positions % cfg.block_size

    def write_kv_batch(
        self,
        seq_ids: SequenceOf[int],
        layer: int,
        starts: SequenceOf[int],
        keys: np.ndarray,
        values: np.ndarray,
    ) -> None:
        """`write_kv` for several distinct sequences at once, n rows each (D8).

        keys[b] and values[b] go to positions [starts[b], starts[b] + n) of seq_ids[b].

        Requires:
            K/V storage; `seq_ids` a non-empty batch of distinct live handles; `starts` a batch of
            one count per sequence; `keys` and `values` `[B, n, kv_heads, head_dim]`; for each
            sequence, what `write_kv` requires.

        Effects:
            The rows of every sequence, in that layer, once all of them passed their checks. No
            tick.

        Raises:
            StorageDisabledError: the cache is metadata-only.
            InvalidArgumentError: `seq_ids` is not a batch.
            UnknownSequenceError: an element of `seq_ids` is not a live handle.
            InvalidArgumentError: `starts` is not a batch; an empty batch (D11), a sequence twice,
                or not one start each.
            KVShapeError: `keys` or `values` is not `[B, n, kv_heads, head_dim]`.
            InvalidArgumentError: then per sequence, in batch order, the checks of `write_kv`
                after the handle: `layer` out of range or a start not a count; then its
                KVDtypeError, KVShapeError, InvalidPositionError, NotWritableError.
        """
        storage = self._require_storage("write_kv_batch")
        seqs = [self._sequence(s) for s in checks.as_batch(seq_ids, "write_kv_batch seq_ids")]
        starts = checks.as_batch(starts, "write_kv_batch starts")
        if not seqs or len({s.id for s in seqs}) != len(seqs) or len(starts) != len(seqs):
            raise errors.not_one_start_each(len(seqs), len(starts))
        for name, array in (("keys", keys), ("values", values)):
            if not isinstance(array, np.ndarray) or array.ndim != 4 or len(array) != len(seqs):
                shape = getattr(array, "shape", type(array).__name__)
                raise errors.batch_kv_shape(name, len(seqs), shape)
        plans = [
            self._check_write(seq, layer, start, keys[b], values[b])
            for b, (seq, start) in enumerate(zip(seqs, starts))
        ]
        for b, (layer_index, blocks, rows) in enumerate(plans):
            storage.write_rows(layer_index, blocks, rows, keys[b], values[b])

    # ---- reads: gather and attention -----------------------------------------------------------

    def _rows_of(self, seq: Sequence) -> tuple[np.ndarray, np.ndarray]:
        positions = np.arange(len(seq.tokens))
        blocks = np.array(seq.table, dtype=np.int64)[positions // self.config.block_size]
        return blocks, positions % self.config.block_size

    def gather(self, seq_id: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V of every position of the sequence, in order, for one layer. No tick.

        Requires:
            K/V storage; a live handle; `layer` in [0, num_layers).

        Returns:
            (keys, values), each `[len, kv_heads, head_dim]` of the cache's dtype (bfloat16 as
            uint16 bits); zeros at positions the window released (D10).

        Raises:
            StorageDisabledError: the cache is metadata-only.
            UnknownSequenceError: `seq_id` is not a live handle.
            InvalidArgumentError: `layer` out of range.
        """
        storage = self._require_storage("gather")
        seq = self._sequence(seq_id)
        layer = checks.as_layer(layer, self.config.num_layers)
        return self._read(storage, seq, layer)

    def _read(self, storage: KVStorage, seq: Sequence, layer: int):
        """Every position's K/V rows; zeros for positions the window released (rule 10)."""
        blocks, rows = self._rows_of(seq)
        held = blocks != HOLE
        keys, values = storage.read_rows(layer, np.where(held, blocks, 0), rows)
        keys[~held], values[~held] = 0, 0
        return keys, values

    def _gather_float32(self, seq: Sequence, layer: int) -> tuple[np.ndarray, np.ndarray]:
        keys, values = self._read(self._require_storage("attention"), seq, layer)
        return to_float32(keys, self.config.dtype), to_float32(values, self.config.dtype)

    def _require_window_held(
        self, seq: Sequence, first_query: int, asked: str, window: int | None
    ) -> None:
        """Rule 10: a query's window must not reach a released position."""
        held_from = leading_holes(seq.table) * self.config.block_size
        start = 0 if window is None else max(first_query - window + 1, 0)
        if start < held_from:
            raise errors.window_released(asked, first_query, start, seq.id, held_from)

    def attention_decode(
        self,
        layer: int,
        seq_ids: SequenceOf[int],
        queries: np.ndarray,
        scale: float | None = None,
        window: int | None = None,
        sinks: np.ndarray | None = None,
    ) -> np.ndarray:
        """One query per sequence at its last position, batched over ragged lengths. No tick.

        Query b attends over the keys of seq_ids[b], only the last `window` of them for a
        sliding-window layer, with optional per-head `sinks` logits (`reference_attention`;
        `split_k.split_k_decode` computes the same by splits, as the MLX kernels do).

        Requires:
            K/V storage; `layer` in [0, num_layers); `seq_ids` a batch of live, non-empty sequences
            (it may be empty, D11); `queries` a float array `[B, q_heads, head_dim]`, q_heads a
            multiple of kv_heads; `scale` None (1 / sqrt(head_dim)) or a finite real; `window` None
            (the cache's `Config.window`) or an int >= 1; `sinks` None or `[q_heads]` finite floats;
            no query's window reaching a released position (D10).

        Returns:
            `[B, q_heads, head_dim]` float32; for an empty batch, an empty array of that shape
            (D11).

        Raises:
            StorageDisabledError: the cache is metadata-only.
            InvalidArgumentError: `layer` out of range, or `seq_ids` not a batch.
            UnknownSequenceError: an element of `seq_ids` is not a live handle.
            KVDtypeError: `queries` is not a float array.
            KVShapeError: `queries` is not `[B, q_heads, head_dim]` as required.
            InvalidArgumentError: a bad `scale`, `window` or `sinks`.
            InvalidPositionError: a query's window reaches a released position, or a sequence is
                empty.
        """
        self._require_storage("attention_decode")
        layer = checks.as_layer(layer, self.config.num_layers)
        seqs = [self._sequence(s) for s in checks.as_batch(seq_ids, "attention_decode seq_ids")]
        queries = checks.check_queries(
            queries, self.config.num_kv_heads, self.config.head_dim, len(seqs)
        )
        scale = checks.as_scale(scale, self.config.head_dim)
        window = checks.as_window(window)
        sinks = checks.check_sinks(sinks, queries.shape[1])
        if window is None:  # rule 10: a windowed cache's layers attend within its window
            window = self.config.window
        for seq in seqs:  # every check before the first computation
            if seq.tokens:
                self._require_window_held(seq, len(seq.tokens) - 1, "attention_decode", window)
        outputs = []
        for b, seq in enumerate(seqs):
            if not seq.tokens:
                raise errors.empty_sequence(seq.id)
            keys, values = self._gather_float32(seq, layer)
            last = np.array([len(seq.tokens) - 1])
            outputs.append(
                reference_attention(queries[b : b + 1], keys, values, last, scale, window, sinks)[0]
            )
        return np.stack(outputs) if outputs else np.zeros_like(queries)

    def attention_prefill(
        self, seq_id: int, layer: int, queries: np.ndarray, scale: float | None = None
    ) -> np.ndarray:
        """Causal attention for the last L positions of a sequence (after a cached prefix). No tick.

        The query at position p sees keys 0..p, or only the last `Config.window` of them.

        Requires:
            K/V storage; a live handle; `layer` in [0, num_layers); `queries` a float array `[L,
            q_heads, head_dim]` with 1 <= L <= len and q_heads a multiple of kv_heads; `scale` None
            or a finite real; the first query's window not reaching a released position (D10).

        Returns:
            `[L, q_heads, head_dim]` float32.

        Raises:
            StorageDisabledError: the cache is metadata-only.
            UnknownSequenceError: `seq_id` is not a live handle.
            InvalidArgumentError: `layer` out of range.
            KVDtypeError: `queries` is not a float array.
            KVShapeError: `queries` is not `[L >= 1, q_heads, head_dim]` as required.
            InvalidPositionError: L is greater than the sequence's length.
            InvalidArgumentError: a bad `scale`.
            InvalidPositionError: the first query's window reaches a released position.
        """
        self._require_storage("attention_prefill")
        seq = self._sequence(seq_id)
        layer = checks.as_layer(layer, self.config.num_layers)
        queries = checks.check_queries(
            queries, self.config.num_kv_heads, self.config.head_dim, None
        )
        count = queries.shape[0]
        if not 1 <= count <= len(seq.tokens):
            raise errors.prefill_queries(count, seq.id, len(seq.tokens))
        scale = checks.as_scale(scale, self.config.head_dim)
        window = self.config.window
        self._require_window_held(seq, len(seq.tokens) - count, "attention_prefill", window)
        keys, values = self._gather_float32(seq, layer)
        positions = np.arange(len(seq.tokens) - count, len(seq.tokens))
        return reference_attention(queries, keys, values, positions, scale, window)
