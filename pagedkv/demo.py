"""`python -m pagedkv demo`: a serving scenario on the paged cache, summarised as a table.

Requests share a system prompt; one is forked (parallel sampling), one is trimmed (a rejected
speculative draft), and the pool is sized so later requests force evictions of cached prefixes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from pagedkv.config import Config
from pagedkv.types import Stats

SYSTEM_PROMPT = [(7 * i + 3) % 32000 for i in range(512)]


def run_scenario(cache_class: Callable, requests: int = 8, block_size: int = 16) -> tuple:
    """Runs the scenario metadata-only; returns (cache, dense token count, peak blocks in use)."""
    suffix_len, decode_steps = 60, 32
    per_request_blocks = -(-(len(SYSTEM_PROMPT) + suffix_len + decode_steps) // block_size)
    # Room for everything shared once, but not for the later, unrelated prompts: they evict.
    num_blocks = per_request_blocks + requests * 8
    cache = cache_class(Config(num_blocks=num_blocks, block_size=block_size, store_kv=False))
    seqs, peak = [], 0
    for r in range(requests):
        prompt = SYSTEM_PROMPT + [(r * 31 + j) % 32000 for j in range(suffix_len)]
        seq, _ = cache.add_sequence(prompt)
        cache.commit(seq)
        seqs.append(seq)
    seqs.append(cache.fork(seqs[0]))  # parallel sampling: a second continuation of request 0
    for step in range(decode_steps):
        for i, seq in enumerate(seqs):
            cache.extend(seq, [1000 + 17 * i + step])
        peak = max(peak, cache.stats().in_use_blocks)
    cache.trim(seqs[1], 5)  # a speculative draft of 5 tokens rejected
    dense_tokens = sum(cache.sequence_length(s) for s in seqs)
    for seq in seqs:
        cache.commit(seq)
        cache.free(seq)
    for r in range(3):  # unrelated long prompts under pressure: cached prefix blocks are evicted
        seq, _ = cache.add_sequence([20000 + r] * (num_blocks // 2 * block_size))
        cache.free(seq)
    return cache, dense_tokens, peak


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value:>12}" for name, value in rows)


def summary_rows(stats: Stats, dense_tokens: int, peak: int, block_size: int) -> list:
    dense_blocks = -(-dense_tokens // block_size)
    return [
        ("blocks in use at peak (paged)", f"{peak}"),
        ("blocks a dense cache would hold", f"{dense_blocks}"),
        ("memory saved", f"{1 - peak / dense_blocks:.1%}"),
        ("prompt tokens", f"{stats.prompt_tokens}"),
        ("prefill tokens avoided", f"{stats.prefill_tokens_avoided}"),
        ("copy-on-write copies", f"{stats.cow_copies}"),
        ("evictions", f"{stats.evictions}"),
        ("duplicate blocks kept", f"{stats.duplicates}"),
    ]


def metadata_scenario(requests: int) -> int:
    """Part 1: the scenario on the spec, then on the MLX backend, which must match it exactly."""
    from pagedkv.spec import PagedCache as SpecCache

    started = time.perf_counter()
    cache, dense, peak = run_scenario(SpecCache, requests=requests)
    print(
        f"[1/2] {requests} requests sharing a {len(SYSTEM_PROMPT)}-token system prompt, one "
        "forked, one trimmed, pool under pressure (block metadata)"
    )
    print(format_table(summary_rows(cache.stats(), dense, peak, cache.config.block_size)))
    cache.check_invariants()
    try:
        from pagedkv.mlx_backend import PagedCache as MLXCache
    except ImportError:
        print("  MLX is not installed: backend check skipped (pip install 'pagedkv[mlx]')")
        return 0
    backend, _, backend_peak = run_scenario(MLXCache, requests=requests)
    backend.check_invariants()
    if backend.snapshot() != cache.snapshot() or backend_peak != peak:
        print("  MISMATCH: the MLX backend's state differs from the spec's", file=sys.stderr)
        return 1
    print(
        "  spec and MLX backend: identical block tables, free queue, index and stats "
        f"({time.perf_counter() - started:.2f}s)"
    )
    return 0


def main(args) -> int:
    return metadata_scenario(args.requests)
