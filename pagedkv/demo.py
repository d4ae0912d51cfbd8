"""`python -m pagedkv demo`: a serving scenario on the paged cache, summarised as a table.

Requests share a system prompt; one is forked (parallel sampling), one is trimmed (a rejected
speculative draft), and the pool is sized so later requests force evictions of cached prefixes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from pagedkv.config import Config, ceil_div
from pagedkv.types import Stats

SYSTEM_PROMPT = [(7 * i + 3) % 32000 for i in range(512)]


def run_scenario(cache_class: Callable, requests: int = 8, block_size: int = 16) -> tuple:
    """Runs the scenario metadata-only; returns (cache, dense token count, peak blocks in use)."""
    suffix_len, decode_steps = 60, 32
    per_request_blocks = ceil_div(len(SYSTEM_PROMPT) + suffix_len + decode_steps, block_size)
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
    dense_blocks = ceil_div(dense_tokens, block_size)
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


def model_scenario(requests: int, new_tokens: int = 24) -> int:
    """Part 2: concurrent requests through an mlx-lm model on the paged cache vs mlx-lm's own."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from pagedkv.mlx_lm import PagedKVStore
    from pagedkv.models import SMALL, random_model

    started = time.perf_counter()
    model = random_model(SMALL)  # random weights, from mlx-lm's own Llama class
    system = SYSTEM_PROMPT[:256]
    prompts = [
        [t % 1024 for t in system] + [(97 * r + j) % 1024 for j in range(16)]
        for r in range(requests)
    ]
    store = PagedKVStore.for_model(model, num_blocks=requests * 8 + 64, block_size=16)
    sessions, tokens = [], []
    for prompt in prompts:  # prefill each request; all stay open at once
        session = store.open(prompt)
        logits = model(mx.array(session.remaining_prompt)[None], cache=session.caches)
        tokens.append([int(mx.argmax(logits[0, -1]).item())])
        sessions.append(session)
    batch = store.batch(sessions)
    for _ in range(new_tokens - 1):  # batched greedy decoding, one model call per step
        logits = model(mx.array([[t[-1]] for t in tokens]), cache=batch)
        for row, token in enumerate(mx.argmax(logits[:, -1], axis=-1).tolist()):
            tokens[row].append(token)
    stats = store.cache.stats()
    paged_bytes = stats.in_use_blocks * store.config.bytes_per_block
    dense_bytes = stats.tokens_stored * store.config.bytes_per_block // store.config.block_size

    def greedy(logprobs):
        return mx.argmax(logprobs, axis=-1)

    same = all(
        [t for t, _ in generate_step(mx.array(p), model, max_tokens=new_tokens, sampler=greedy)]
        == generated
        for p, generated in zip(prompts, tokens)
    )
    print(
        f"[2/2] {requests} concurrent requests, random-weight Llama (4 layers) from mlx-lm, "
        f"256-token shared system prompt, {new_tokens} greedy tokens each, on "
        f"{mx.default_device()}"
    )
    print(
        format_table(
            [
                ("K/V bytes in use (paged)", f"{paged_bytes / 2**20:.2f} MiB"),
                ("K/V bytes, dense per-request", f"{dense_bytes / 2**20:.2f} MiB"),
                ("memory saved", f"{1 - paged_bytes / dense_bytes:.1%}"),
                ("prefill tokens avoided", f"{stats.prefill_tokens_avoided}"),
                ("tokens identical to mlx-lm KVCache", "yes" if same else "NO"),
            ]
        )
    )
    for session in sessions:
        session.close()
    store.cache.check_invariants()
    print(f"  ({time.perf_counter() - started:.2f}s)")
    return 0 if same else 1


def main(args) -> int:
    status = metadata_scenario(args.requests)
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        print("[2/2] skipped: mlx-lm is not installed (pip install 'pagedkv[mlx]')")
        return status
    return status or model_scenario(args.requests)
