"""The K/V half of the backend's `PagedCache` (mirrors `pagedkv.spec.kv`): writing rows into
reserved blocks, reading them back, and attention (`attention.py`: the fused kernel or gather).

Written independently of the spec; the same checks in the same order, before any change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from pagedkv import errors
from pagedkv.mlx_backend import attention, checks
from pagedkv.mlx_backend.storage import KVStorage

if TYPE_CHECKING:
    from pagedkv.mlx_backend.cache import Sequence


class KVOperations:
    """Mixed into `PagedCache`: expects `config`, `storage`, `size`, `clock`, `_sequence` and
    `_is_writable`."""

    # ---- write ---------------------------------------------------------------------------------

    def _require_storage(self, op: str) -> KVStorage:
        if self.storage is None:
            raise errors.storage_disabled(op)
        return self.storage

    def write_kv(self, seq_id: int, layer: int, start: int, keys, values) -> None:
        storage = self._require_storage("write_kv")
        seq = self._sequence(seq_id)
        cfg = self.config
        layer = checks.as_layer(layer, cfg.num_layers)
        start = checks.as_count(start, "start")
        rows = checks.check_kv(keys, values, storage.dtype, cfg.num_kv_heads, cfg.head_dim)
        if start + rows > len(seq.tokens):
            raise errors.write_past_end(start, rows, seq.id, len(seq.tokens))
        storage.write_rows(layer, self._planned_runs(seq, start, rows), keys, values)

    def _planned_runs(
        self, seq: Sequence, start: int, rows: int
    ) -> list[tuple[int, int, int, int]]:
        """`_runs`, remembered until the clock ticks: every layer of a step writes the same rows,
        and tables or writability change only through metadata operations, which tick."""
        key = (self.clock, seq.id, start, rows)
        runs = self._plans.get(key)
        if runs is None:
            if self._plans_clock != self.clock:
                self._plans.clear()
                self._plans_clock = self.clock
            runs = self._plans[key] = self._runs(seq, start, rows)
        return runs

    def _runs(self, seq: Sequence, start: int, rows: int) -> list[tuple[int, int, int, int]]:
        """(block, first row, rows, offset) per touched block; raises if one is not writable."""
        runs, position, size = [], start, self.size
        while position < start + rows:  # one contiguous run per touched block
            block = int(seq.table[position // size])
            if block < 0:
                raise errors.write_released(position, seq.id)
            if not self._is_writable(block):
                raise errors.write_shared(block, seq.id, self.pool.refcounts[block])
            count = min(size - position % size, start + rows - position)
            runs.append((block, position % size, count, position - start))
            position += count
        return runs

    def write_kv_batch(self, seq_ids, layer: int, starts, keys, values) -> None:
        storage = self._require_storage("write_kv_batch")
        seqs = [self._sequence(s) for s in checks.as_batch(seq_ids, "write_kv_batch seq_ids")]
        starts = checks.as_batch(starts, "write_kv_batch starts")
        if not seqs or len(set(map(id, seqs))) != len(seqs) or len(starts) != len(seqs):
            raise errors.not_one_start_each(len(seqs), len(starts))
        for name, array in (("keys", keys), ("values", values)):
            if not isinstance(array, mx.array) or array.ndim != 4 or array.shape[0] != len(seqs):
                shape = getattr(array, "shape", type(array).__name__)
                raise errors.batch_kv_shape(name, len(seqs), shape)
        cfg = self.config
        layer = checks.as_layer(layer, cfg.num_layers)
        checked, rows = [], 0
        for b, (seq, start) in enumerate(zip(seqs, starts)):  # checks in the spec's order
            start = checks.as_count(start, "start")
            if b == 0:  # every sequence gets rows of the same shape and dtype
                rows = checks.check_kv(
                    keys[0], values[0], storage.dtype, cfg.num_kv_heads, cfg.head_dim
                )
            if start + rows > len(seq.tokens):
                raise errors.write_past_end(start, rows, seq.id, len(seq.tokens))
            checked.append(start)
        # Every layer of a step writes the same slots; remembered until the clock ticks.
        key = (self.clock, "batch", tuple(seq.id for seq in seqs), tuple(checked), rows)
        slots = self._plans.get(key)
        if slots is None:
            slots = self._batch_slots(seqs, checked, rows)
            if self._plans_clock != self.clock:
                self._plans.clear()
                self._plans_clock = self.clock
            self._plans[key] = slots
        storage.scatter_rows(
            layer,
            *slots,
            keys.reshape(-1, *keys.shape[2:]),
            values.reshape(-1, *values.shape[2:]),
        )

    def _batch_slots(self, seqs: list[Sequence], starts: list[int], rows: int):
        """(block index, row index) `[n]` int32 of every row a checked batch write touches;
        raises NotWritableError for a block the sequence does not own exclusively."""
        blocks, offsets = [], []
        for seq, start in zip(seqs, starts):
            for block, row, count, _ in self._runs(seq, start, rows):
                blocks += [block] * count
                offsets += range(row, row + count)
        return mx.array(blocks, dtype=mx.int32), mx.array(offsets, dtype=mx.int32)

    # ---- reads: gather and attention -----------------------------------------------------------

    def gather(self, seq_id: int, layer: int):
        storage = self._require_storage("gather")
        seq = self._sequence(seq_id)
        layer = checks.as_layer(layer, self.config.num_layers)
        blocks = np.maximum(seq.table[: seq.num_blocks], 0)  # holes read block 0, zeroed below
        keys, values = storage.gather(layer, mx.array(blocks), len(seq.tokens))
        if seq.holes:  # rule 10: released positions read as zeros
            held = (mx.arange(len(seq.tokens)) >= seq.holes * self.size)[:, None, None]
            keys, values = mx.where(held, keys, 0), mx.where(held, values, 0)
        return keys, values

    attention_decode = attention.attention_decode
    attention_prefill = attention.attention_prefill
