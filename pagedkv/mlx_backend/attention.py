"""Paged attention on MLX: gather blocks by table with `mx.take` (layout A), then
`mx.fast.scaled_dot_product_attention`. GQA comes from SDPA itself (q_heads a multiple of kv_heads).

Decode pads every block table of the batch to the longest one (padding points at block 0, whose
rows are masked out) and masks keys past each sequence's length, so one SDPA call serves ragged
lengths. Prefill attends the last L positions causally over the whole sequence.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from pagedkv.errors import InvalidPositionError
from pagedkv.mlx_backend import validate


def gather_batch(pool: mx.array, tables: mx.array) -> mx.array:
    """pool `[N, S, H, D]`, tables `[B, T]` -> `[B, H, T * S, D]`, ready for SDPA."""
    batch, blocks = tables.shape
    taken = mx.take(pool, tables.reshape(-1), axis=0)  # [B * T, S, H, D]
    taken = taken.reshape(batch, blocks * pool.shape[1], pool.shape[2], pool.shape[3])
    return taken.transpose(0, 2, 1, 3)


def pad_tables(tables: list[np.ndarray]) -> mx.array:
    """Block tables padded with block 0 (masked or sliced off by callers) to one width: `[B, T]`."""
    padded = np.zeros((len(tables), max(len(t) for t in tables)), np.int32)
    for row, table in enumerate(tables):
        padded[row, : len(table)] = table
    return mx.array(padded)


def attention_decode(cache, layer: int, seq_ids, queries, scale: float | None = None) -> mx.array:
    """One query per sequence, ragged lengths: `[B, q_heads, D]` -> `[B, q_heads, D]`
    (queries' dtype). Same contract as the spec's attention_decode."""
    storage = cache._storage("attention_decode")
    cfg = cache.config
    layer = validate.layer(layer, cfg.num_layers)
    seqs = [cache._seq(s) for s in seq_ids]
    queries = validate.queries(queries, cfg.num_kv_heads, cfg.head_dim, len(seqs))
    scale = validate.scale(scale, cfg.head_dim)
    if not seqs:
        return mx.zeros_like(queries)
    for seq in seqs:
        if not seq.tokens:
            raise InvalidPositionError(f"attention_decode over empty sequence {seq.id}.")
    tables = pad_tables([seq.table[: seq.num_blocks] for seq in seqs])
    lengths = np.array([len(seq.tokens) for seq in seqs], np.int32)
    keys = gather_batch(storage.keys[layer], tables).astype(queries.dtype)
    values = gather_batch(storage.values[layer], tables).astype(queries.dtype)
    positions = mx.arange(keys.shape[2])
    mask = positions[None, :] < mx.array(lengths)[:, None]  # [B, T*S]
    out = mx.fast.scaled_dot_product_attention(
        queries[:, :, None, :], keys, values, scale=scale, mask=mask[:, None, None, :]
    )
    return out[:, :, 0, :]


def attention_prefill(cache, seq_id: int, layer: int, queries, scale: float | None = None):
    """Causal attention for the last L positions: `[L, q_heads, D]` -> `[L, q_heads, D]`."""
    storage = cache._storage("attention_prefill")
    seq = cache._seq(seq_id)
    cfg = cache.config
    layer = validate.layer(layer, cfg.num_layers)
    queries = validate.queries(queries, cfg.num_kv_heads, cfg.head_dim, None)
    count, length = queries.shape[0], len(seq.tokens)
    if not 1 <= count <= length:
        raise InvalidPositionError(
            f"attention_prefill with {count} queries but sequence {seq.id} has {length} "
            "positions; pass 1..len queries."
        )
    scale = validate.scale(scale, cfg.head_dim)
    table = mx.array(seq.table[None, : seq.num_blocks])
    keys = gather_batch(storage.keys[layer], table)[:, :, :length].astype(queries.dtype)
    values = gather_batch(storage.values[layer], table)[:, :, :length].astype(queries.dtype)
    query_pos = mx.arange(length - count, length)
    mask = mx.arange(length)[None, :] <= query_pos[:, None]  # [L, len]
    out = mx.fast.scaled_dot_product_attention(
        queries.transpose(1, 0, 2)[None], keys, values, scale=scale, mask=mask
    )
    return out[0].transpose(1, 0, 2)
