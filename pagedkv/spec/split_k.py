"""Split-K decode attention: what every paged decode kernel computes, written plainly.

One decode step asks, for each sequence b and query head h, for

    out[b, h] = sum_t softmax(scale * q[b, h] . k[t])_t * v[t]     over visible keys t

where the visible keys are positions `first[b] <= t < length[b]` (`first` > 0 for sliding-window
layers) read through the block table: key t lives in block `tables[b, t // S]`, row `t % S`.

A kernel cannot hold all scores of a long sequence at once, and one worker per sequence would
leave most of a GPU idle. So the visible blocks are cut into `num_splits` contiguous *splits*;
each split is walked block by block keeping three running values per query (the *online
softmax*):

- `m`   the largest score seen so far,
- `l`   the sum of exp(score - m) over the keys seen,
- `acc` the sum of exp(score - m) * v over the keys seen (an unnormalised output).

When a new block raises the maximum from m to m', the old sums are rescaled by exp(m - m'); this
keeps every exponent <= 0, so nothing overflows. Two splits (m1, l1, acc1) and (m2, l2, acc2)
merge the same way: with M = max(m1, m2), l = l1 exp(m1 - M) + l2 exp(m2 - M) and likewise for
acc. The result is acc / l, equal to the plain softmax up to float rounding — the property tests
in `tests/unit/test_split_k.py` hold it to the spec's `reference_attention`.

An *attention sink* (gpt-oss) is one extra logit per query head that takes part in the
denominator but contributes no value: it merges as a split with m = sink, l = 1, acc = 0.

Kernels compute this within their dtype's rounding: on NVIDIA GPUs from sm_80 the tensor-core
kernel for 16-bit pools (`paged_decode_mma.cu`) also rounds exp(score - m) to the pool's dtype
before multiplying it by v, as flash-attention kernels do; l keeps the unrounded values.

Grouped-query attention: query head h reads kv head h // G with G = q_heads // kv_heads, so a
kernel loads each K/V row once for the G query heads of its group. A split with no visible key
(a short row in a ragged batch) contributes m = -inf, l = 0 and drops out of the merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagedkv.config import ceil_div


@dataclass
class Partial:
    """The online-softmax state of one split for the G query heads of one kv head."""

    m: np.ndarray  # [G] running max score
    l: np.ndarray  # [G] running sum of exp(score - m)  # noqa: E741
    acc: np.ndarray  # [G, D] running sum of exp(score - m) * value


def split_blocks(first: int, length: int, block_size: int, num_splits: int) -> list[range]:
    """The visible positions of each split: whole blocks of [first, length), in order.

    The blocks holding visible keys are dealt out in contiguous runs of ceil(blocks / num_splits);
    the first block is cut at `first`, the last at `length`. Later splits may be empty."""
    first_block, end_block = first // block_size, ceil_div(length, block_size)
    per_split = ceil_div(end_block - first_block, num_splits)
    splits = []
    for split in range(num_splits):
        begin_block = first_block + split * per_split
        begin = max(first, begin_block * block_size)
        end = min(length, (begin_block + per_split) * block_size)
        splits.append(range(begin, max(begin, end)))
    return splits


def empty_partial(group: int, head_dim: int) -> Partial:
    """The state before any key: no maximum yet, nothing summed."""
    return Partial(
        np.full(group, -np.inf, np.float32),
        np.zeros(group, np.float32),
        np.zeros((group, head_dim), np.float32),
    )


def absorb(state: Partial, scores: np.ndarray, values: np.ndarray) -> Partial:
    """Folds a run of keys into the running state. scores: [G, n], values: [n, D]."""
    new_m = np.maximum(state.m, scores.max(axis=1))
    rescale = np.exp(state.m - new_m)  # exp(-inf) = 0 for an empty state
    weights = np.exp(scores - new_m[:, None])  # [G, n]
    return Partial(
        new_m,
        state.l * rescale + weights.sum(axis=1),
        state.acc * rescale[:, None] + weights @ values,
    )


def merge(parts: list[Partial], sinks: np.ndarray | None) -> np.ndarray:
    """acc / l over every split (and the sinks): `[G, D]`."""
    if sinks is not None:  # a sink is a split that holds one logit and no value
        parts = [*parts, Partial(sinks, np.ones_like(sinks), np.zeros_like(parts[0].acc))]
    top = np.max([p.m for p in parts], axis=0)  # [G]
    total_l = sum(p.l * np.exp(p.m - top) for p in parts)
    total_acc = sum(p.acc * np.exp(p.m - top)[:, None] for p in parts)
    return total_acc / total_l[:, None]


def split_k_decode(
    queries: np.ndarray,  # [B, q_heads, D]
    k_pool: np.ndarray,  # [blocks, block_size, kv_heads, D] float32 (float32 math throughout)
    v_pool: np.ndarray,
    tables: np.ndarray,  # [B, T] int
    bounds: np.ndarray,  # [B, 2] int: first visible position, length (first < length)
    scale: float,
    num_splits: int,
    sinks: np.ndarray | None = None,  # [q_heads]
) -> np.ndarray:  # [B, q_heads, D] float32
    """Decode attention by splits and online softmax, block by block, as the kernels do it."""
    rows, q_heads, head_dim = queries.shape
    block_size, kv_heads = k_pool.shape[1], k_pool.shape[2]
    group = q_heads // kv_heads
    out = np.zeros((rows, q_heads, head_dim), np.float32)
    for b in range(rows):
        first, length = int(bounds[b, 0]), int(bounds[b, 1])
        for kvh in range(kv_heads):
            heads = slice(kvh * group, (kvh + 1) * group)
            q = queries[b, heads].astype(np.float32) * np.float32(scale)  # [G, D]
            parts = []
            for positions in split_blocks(first, length, block_size, num_splits):
                state = empty_partial(group, head_dim)
                for index in range(
                    positions.start // block_size, ceil_div(positions.stop, block_size)
                ):
                    start = max(positions.start, index * block_size)  # this block's visible rows
                    stop = min(positions.stop, (index + 1) * block_size)
                    block = tables[b, index]
                    k = k_pool[
                        block, start % block_size : (stop - 1) % block_size + 1, kvh
                    ]  # [n, D]
                    v = v_pool[block, start % block_size : (stop - 1) % block_size + 1, kvh]
                    state = absorb(state, q @ k.T, v)
                parts.append(state)
            sink = None if sinks is None else sinks[heads].astype(np.float32)
            out[b, heads] = merge(parts, sink)
    return out
