"""Reference attention over gathered K/V, in float32: the numbers paged attention must reproduce.

Grouped-query attention: with `q_heads` query heads and `kv_heads` K/V heads, query head h reads K/V
head `h // (q_heads // kv_heads)`. A query at position p sees keys at positions 0..p (causal), or
with a sliding window W only p - W + 1..p.
"""

from __future__ import annotations

import numpy as np


def reference_attention(
    queries: np.ndarray,  # [L, q_heads, head_dim] float32
    keys: np.ndarray,  # [T, kv_heads, head_dim] float32
    values: np.ndarray,  # [T, kv_heads, head_dim] float32
    query_positions: np.ndarray,  # [L] absolute positions of the queries, each < T
    scale: float,
    window: int | None = None,
    sinks: np.ndarray | None = None,  # [q_heads] float32
) -> np.ndarray:  # [L, q_heads, head_dim] float32
    """softmax(q k^T * scale, masked to keys at positions <= the query's) @ v, per head.

    window: a query at position p sees only keys p - window < t <= p (sliding-window layers).
    sinks: one extra logit per query head that joins the softmax denominator with no value."""
    group = queries.shape[1] // keys.shape[1]
    keys = np.repeat(keys, group, axis=1)  # [T, q_heads, D]
    values = np.repeat(values, group, axis=1)
    scores = np.einsum("lhd,thd->hlt", queries, keys) * np.float32(scale)  # [q_heads, L, T]
    key_positions = np.arange(keys.shape[0])[None, :]
    visible = key_positions <= query_positions[:, None]  # [L, T]
    if window is not None:
        visible &= key_positions > query_positions[:, None] - window
    scores = np.where(visible[None], scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    if sinks is not None:
        top = np.maximum(top, sinks[:, None, None])
    weights = np.exp(scores - top)
    total = weights.sum(axis=-1, keepdims=True)
    if sinks is not None:
        total = total + np.exp(sinks[:, None, None] - top)
    weights = weights / total
    return np.einsum("hlt,thd->lhd", weights, values).astype(np.float32)
