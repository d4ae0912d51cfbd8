"""One decode step of one group, shared by all its layers: where the new rows go, what to read.

A decode step runs every layer of the model once with one new token per session. The first layer
to reach the step takes the full path of `PagedLayerCache.update_and_fetch`: every check, the
reservation of the new positions in the cache (which ticks its clock), the write through the
backend's validated `write_kv` / `write_kv_batch`. It then records a `DecodeStep`: the slots it
wrote, the padded block tables, the lengths. Every later layer of the group in the same step finds
the step by its key and only checks its own arrays, writes its rows to the same slots (on CUDA
one in-place kernel, `kernels/write.py`; else one update per pool) and builds its lazy fetch: no
per-layer metadata work, which is most of the host's time in a decode step.

Why reusing the step is exact: the key is (the cache's clock, the sequences, each one's start).
Every metadata operation ticks the clock (add, extend, decode_step, commit, fork, trim, free,
evict), so under one clock the block tables, lengths and writability are those the first layer
checked; and the starts say the layer writes the very positions the first layer wrote.
A closed session freed its sequence (a tick), and a prompt is published by a commit (a tick), so
neither can hide behind a matching key.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np

from pagedkv.mlx_backend.attention import decode_call, dispatch_setting, pad_tables, visible_bounds
from pagedkv.mlx_backend.kernels.decode import DecodeBatch
from pagedkv.mlx_backend.kernels.write import in_place_device


@dataclass
class DecodeStep:
    """What every layer of one group shares in one decode step."""

    # The step's key (see the module docstring): a later layer reuses the step only if all match.
    clock: int  # the cache's clock when the first layer wrote
    seqs: list[int]  # the sessions' sequences in this group
    starts: list[int]  # where each session's new position went
    published: bool  # every session's prompt committed (or the store never publishes prompts)
    tables: mx.array  # [B, T] int32 block tables padded with block 0 (holes too: masked)
    lengths: tuple[int, ...]  # positions per sequence after this step's write (start + 1)
    slots: tuple  # one row: (block, row) ints; several: (block index, row index) [B] int32
    batches: dict = field(default_factory=dict)  # window -> DecodeBatch for the kernel
    calls: dict = field(default_factory=dict)  # (window, query dtype, heads, scale, sinks?) -> call
    setting: tuple = field(default_factory=dispatch_setting)  # the attention path's, read once
    flat: tuple = ()  # the new rows' slots, block * block_size + row, per session
    in_place: bool = False  # later layers write their rows in place (kernels/write.py)
    _flat_slots: mx.array | None = None  # `flat` as an array, made at the first in-place write
    thread: int = field(default_factory=threading.get_ident)  # the thread whose step this is

    @staticmethod
    def build(
        clock, seqs, published: bool, tables: list[np.ndarray], starts, block_size: int,
        in_place: bool = False,
    ):  # fmt: skip
        """The step whose rows land at `starts` (already written by the step's first layer).
        `in_place`: the store allows in-place writes; they happen where the device has them."""
        blocks = [int(t[s // block_size]) for t, s in zip(tables, starts)]
        rows = [s % block_size for s in starts]
        if len(starts) == 1:
            slots = (blocks[0], rows[0])
        else:
            slots = (mx.array(blocks, dtype=mx.int32), mx.array(rows, dtype=mx.int32))
        lengths = tuple(s + 1 for s in starts)
        flat = tuple(b * block_size + r for b, r in zip(blocks, rows))
        tables = pad_tables(tables)
        # a hole (-1) never holds the new row; were it so, the kernel would write out of bounds
        in_place = in_place and min(blocks) >= 0 and in_place_device()
        return DecodeStep(
            clock, list(seqs), list(starts), published, tables, lengths, slots,
            flat=flat, in_place=in_place,
        )  # fmt: skip

    @property
    def length(self) -> int:
        """The longest row: the fetched history's length."""
        return max(self.lengths)

    def batch(self, window: int | None) -> DecodeBatch:
        """The kernel's inputs for attention over a window (None: every position), built once."""
        batch = self.batches.get(window)
        if batch is None:
            bounds, longest = visible_bounds(self.lengths, window)
            batch = self.batches[window] = DecodeBatch(self.tables, bounds, longest)
        return batch

    def attend(self, queries, k_pool, v_pool, window: int | None, scale: float, sinks, tables):
        """Decode attention of one layer (`attention.decode_attention`), its path chosen and its
        launch prepared once per step for each kind of call (the layers of a model share one).
        `tables`: this step's tables as the layer's write left them (`self.tables`, or the copy
        an in-place write returned, which orders the read after it)."""
        key = (window, queries.dtype, queries.shape[1], scale, sinks is None)
        call = self.calls.get(key)
        if call is None:
            batch = self.batch(window)
            if tables is not self.tables:  # a self-check reads after the write too
                batch = replace(batch, tables=tables)
            call = decode_call(queries, k_pool, v_pool, batch, scale, sinks, self.setting)
            self.calls[key] = call
        return call(queries, k_pool, v_pool, sinks, tables)

    def flat_slots(self) -> mx.array:
        """The new rows' slots as `[B]` int32 block * block_size + row (an in-place write's),
        built once per step."""
        if self._flat_slots is None:
            self._flat_slots = mx.array(self.flat, dtype=mx.int32)
        return self._flat_slots
