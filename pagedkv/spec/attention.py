"""Reference attention over gathered K/V, in float32: the numbers paged attention must reproduce.

Grouped-query attention: with `q_heads` query heads and `kv_heads` K/V heads, query head h reads K/V
head `h // (q_heads // kv_heads)`. A query at position p sees keys at positions 0..p (causal).
"""

from __future__ import annotations

import numpy as np


def reference_attention(
    queries: np.ndarray,  # [L, q_heads, head_dim] float32
    keys: np.ndarray,  # [T, kv_heads, head_dim] float32
    values: np.ndarray,  # [T, kv_heads, head_dim] float32
    query_positions: np.ndarray,  # [L] absolute positions of the queries, each < T
    scale: float,
) -> np.ndarray:  # [L, q_heads, head_dim] float32
    """softmax(q k^T * scale, masked to keys at positions <= the query's) @ v, per head."""
    group = queries.shape[1] // keys.shape[1]
    keys = np.repeat(keys, group, axis=1)  # [T, q_heads, D]
    values = np.repeat(values, group, axis=1)
    scores = np.einsum("lhd,thd->hlt", queries, keys) * np.float32(scale)  # [q_heads, L, T]
    visible = np.arange(keys.shape[0])[None, :] <= query_positions[:, None]  # [L, T]
    scores = np.where(visible[None], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return np.einsum("hlt,thd->lhd", weights, values).astype(np.float32)
