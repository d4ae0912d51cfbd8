"""Paged attention on MLX.

Decode (one query per sequence) runs the fused paged kernel (`kernels/`: reads K/V in place through
the block tables, split-K, no gathered copy) where `kernels.dispatch` allows it, else the portable
path: gather blocks by table with `mx.take` (layout A), mask keys outside each row's visible range,
then `mx.fast.scaled_dot_product_attention`. Tables are padded to the longest with block 0, whose
rows neither path reads as keys. GQA: q_heads is a multiple of kv_heads.

Prefill attends the last L positions causally over the whole sequence by gather -> SDPA: it is
compute-bound, so the gathered copy costs little next to the attention itself.
"""

from __future__ import annotations

import os
from dataclasses import replace

import mlx.core as mx
import numpy as np

from pagedkv import errors
from pagedkv.mlx_backend import checks
from pagedkv.mlx_backend.kernels import decode, dispatch
from pagedkv.mlx_backend.kernels.decode import DecodeBatch


def gather_batch(pool: mx.array, tables: mx.array) -> mx.array:
    """pool `[N, S, H, D]`, tables `[B, T]` -> `[B, H, T * S, D]`, ready for SDPA."""
    batch, blocks = tables.shape
    taken = mx.take(pool, tables.reshape(-1), axis=0)  # [B * T, S, H, D]
    taken = taken.reshape(batch, blocks * pool.shape[1], pool.shape[2], pool.shape[3])
    return taken.transpose(0, 2, 1, 3)


def pad_tables(tables: list[np.ndarray]) -> mx.array:
    """Block tables padded with block 0 (masked or sliced off by callers) to one width: `[B, T]`.
    Holes (-1, blocks a sliding window released) also read block 0: every query masks them."""
    padded = np.zeros((len(tables), max(len(t) for t in tables)), np.int32)
    for row, table in enumerate(tables):
        padded[row, : len(table)] = np.maximum(table, 0)
    return mx.array(padded)


def visible_bounds(lengths, window: int | None) -> tuple[mx.array, int]:
    """Each row's visible keys `[first, length)` as `[B, 2]` int32 (a window of W: the last W
    positions), and the most visible keys of any row (it picks the kernel's split count)."""
    firsts = [max(0, n - window) if window else 0 for n in lengths]
    bounds = np.array([firsts, lengths], np.int32).T  # [B, 2]
    return mx.array(bounds), max(n - f for n, f in zip(lengths, firsts))


def decode_batch(tables: list[np.ndarray], lengths: list[int], window: int | None) -> DecodeBatch:
    """The per-step kernel inputs for rows with these block tables and lengths (built once per
    step and shared by every layer): padded tables, (first visible, length) bounds, longest row."""
    return DecodeBatch(pad_tables(tables), *visible_bounds(lengths, window))


def gather_decode(queries, k_pool, v_pool, batch: DecodeBatch, scale: float, sinks=None):
    """The portable path and the kernel's oracle: gather every table's blocks, mask keys outside
    each row's [first, length), one SDPA call. `[B, q_heads, D]` -> `[B, q_heads, D]`."""
    keys = gather_batch(k_pool, batch.tables).astype(queries.dtype)  # [B, kv_heads, T*S, D]
    values = gather_batch(v_pool, batch.tables).astype(queries.dtype)
    positions = mx.arange(keys.shape[2])[None, :]
    mask = (positions >= batch.bounds[:, :1]) & (positions < batch.bounds[:, 1:])  # [B, T*S]
    if sinks is not None:  # SDPA wants sinks in a type that promotes to the output's
        sinks = sinks.astype(queries.dtype)
    single = queries.ndim == 3
    out = mx.fast.scaled_dot_product_attention(
        queries[:, :, None, :] if single else queries,
        keys, values, scale=scale, mask=mask[:, None, None, :], sinks=sinks,
    )  # fmt: skip
    return out[:, :, 0, :] if single else out


def dispatch_setting() -> tuple[str | None, str | None]:
    """What the path choice depends on besides shapes: the `PAGEDKV_ATTENTION` setting and the
    device's kernel backend. A decode step reads it once for all its layers."""
    return os.environ.get(dispatch.ENV), decode.backend()


def decode_attention(
    queries, k_pool, v_pool, batch: DecodeBatch, scale: float, sinks=None, setting=None
):
    """Decode attention by the path `PAGEDKV_ATTENTION` and the device choose (kernels.dispatch):
    the fused paged kernel where it is known good, else gather -> SDPA. queries `[B, q_heads, D]`
    or, as mlx-lm passes them, `[B, q_heads, 1, D]`; the output has the queries' shape.
    `setting`: `dispatch_setting()` as the caller read it (a decode step, once), else read here."""
    if _kernel_chosen(queries, k_pool, v_pool, batch, scale, sinks, setting):
        return decode.paged_decode(queries, k_pool, v_pool, batch, scale, sinks)
    return gather_decode(queries, k_pool, v_pool, batch, scale, sinks)


def decode_call(
    queries, k_pool, v_pool, batch: DecodeBatch, scale: float, sinks=None, setting=None
):
    """`decode_attention` for every layer of one decode step, decided and prepared once: a call
    `(queries, k_pool, v_pool, sinks) -> output` for queries and pools of these shapes and dtypes
    (sinks present or not as here). A step's later layers then only launch. The call's optional
    `tables` replace the batch's (the same tables, as an in-place write returned them: the read
    then waits for that write; see kernels/write.py)."""
    if _kernel_chosen(queries, k_pool, v_pool, batch, scale, sinks, setting):
        return decode.prepare(queries, k_pool, batch, scale, sinks is not None)

    def gather(queries, k_pool, v_pool, sinks=None, tables=None):
        read = batch if tables is None else replace(batch, tables=tables)
        return gather_decode(queries, k_pool, v_pool, read, scale, sinks)

    return gather


def _kernel_chosen(queries, k_pool, v_pool, batch, scale, sinks, setting) -> bool:
    """Whether the kernel serves this call. The choice is remembered per (setting, shape): every
    layer of every step asks."""
    q_shape, pool_shape = queries.shape, k_pool.shape
    key = (
        setting or dispatch_setting(), queries.dtype, k_pool.dtype, q_shape[1], q_shape[-1],
        pool_shape[1], pool_shape[2], sinks is not None,
    )  # fmt: skip
    chooser = dispatch.DISPATCHER
    use_kernel = chooser.choices.get(key)
    if use_kernel is None:
        use_kernel = _use_kernel(queries, k_pool, v_pool, batch, scale, sinks)
        chooser.choices[key] = use_kernel
    return use_kernel


def _use_kernel(queries, k_pool, v_pool, batch: DecodeBatch, scale: float, sinks) -> bool:
    """The dispatcher's decision for this shape (runs the self-check where `auto` needs one)."""
    shape = decode.Shape(
        queries.dtype, k_pool.dtype, queries.shape[-1], k_pool.shape[1], k_pool.shape[2],
        queries.shape[1] // k_pool.shape[2], sinks is not None,
    )  # fmt: skip

    def launch(splits: int | None = None):  # None: the split rule's count, as calls will use
        return lambda: decode.paged_decode(
            queries, k_pool, v_pool, batch, scale, sinks, num_splits=splits
        )

    def check():
        return dispatch.self_check(
            launch(),
            lambda: gather_decode(queries, k_pool, v_pool, batch, scale, sinks),
            dispatch.CHECK_TOLERANCE[queries.dtype],
            forms={f"{n} split{'s' * (n > 1)}": launch(n) for n in dispatch.CHECKED_SPLITS},
        )

    return dispatch.DISPATCHER.use_kernel(shape, check)


def attention_decode(
    cache, layer: int, seq_ids, queries, scale=None, window=None, sinks=None
) -> mx.array:
    """One query per sequence, ragged lengths: `[B, q_heads, D]` -> `[B, q_heads, D]`
    (queries' dtype). Same contract as the spec's attention_decode."""
    storage = cache._require_storage("attention_decode")
    cfg = cache.config
    layer = checks.as_layer(layer, cfg.num_layers)
    seqs = [cache._sequence(s) for s in checks.as_batch(seq_ids, "attention_decode seq_ids")]
    queries = checks.check_queries(queries, cfg.num_kv_heads, cfg.head_dim, len(seqs))
    scale = checks.as_scale(scale, cfg.head_dim)
    window = checks.as_window(window)
    sinks = checks.check_sinks(sinks, queries.shape[1])
    if window is None:  # rule 10: a windowed cache's layers attend within its window
        window = cfg.window
    for seq in seqs:  # rule 10, checked first as in the spec
        if seq.tokens:
            _require_window_held(cache, seq, len(seq.tokens) - 1, "attention_decode", window)
    if not seqs:
        return mx.zeros_like(queries)
    for seq in seqs:
        if not seq.tokens:
            raise errors.empty_sequence(seq.id)
    batch = decode_batch(
        [seq.table[: seq.num_blocks] for seq in seqs], [len(seq.tokens) for seq in seqs], window
    )
    storage.settle(layer)  # the adapter's in-place decode writes, if any, before this read
    return decode_attention(queries, *storage.pools(layer), batch, scale, sinks)


def attention_prefill(cache, seq_id: int, layer: int, queries, scale: float | None = None):
    """Causal attention for the last L positions: `[L, q_heads, D]` -> `[L, q_heads, D]`
    (queries' dtype). Same contract as the spec's attention_prefill."""
    storage = cache._require_storage("attention_prefill")
    seq = cache._sequence(seq_id)
    cfg = cache.config
    layer = checks.as_layer(layer, cfg.num_layers)
    queries = checks.check_queries(queries, cfg.num_kv_heads, cfg.head_dim, None)
    count, length = queries.shape[0], len(seq.tokens)
    if not 1 <= count <= length:
        raise errors.prefill_queries(count, seq.id, length)
    scale = checks.as_scale(scale, cfg.head_dim)
    _require_window_held(cache, seq, length - count, "attention_prefill", cfg.window)
    table = mx.array(np.maximum(seq.table[None, : seq.num_blocks], 0))
    storage.settle(layer)  # the adapter's in-place decode writes, if any, before this read
    k_pool, v_pool = storage.pools(layer)
    keys = gather_batch(k_pool, table)[:, :, :length].astype(queries.dtype)
    values = gather_batch(v_pool, table)[:, :, :length].astype(queries.dtype)
    query_pos = mx.arange(length - count, length)
    mask = mx.arange(length)[None, :] <= query_pos[:, None]  # [L, len]
    if cfg.window is not None:
        mask = mask & (mx.arange(length)[None, :] > query_pos[:, None] - cfg.window)
    out = mx.fast.scaled_dot_product_attention(
        queries.transpose(1, 0, 2)[None], keys, values, scale=scale, mask=mask
    )
    return out[0].transpose(1, 0, 2)


def _require_window_held(cache, seq, first_query: int, asked: str, window) -> None:
    held_from = seq.holes * cache.size
    start = 0 if window is None else max(first_query - window + 1, 0)
    if start < held_from:
        raise errors.window_released(asked, first_query, start, seq.id, held_from)
