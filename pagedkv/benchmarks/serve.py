"""`pagedkv bench serve`: one request trace through mlx-lm's BatchGenerator, with mlx-lm's own
caches and with the paged store (admission on), and how many requests fit a fixed K/V budget.

The trace: requests sharing a few long system prompts, each with a private suffix and its own
output length, arriving over time (one every `arrive_every` generator steps). Both runs see the
same trace and greedy sampling; `same_tokens` says whether every request got identical tokens.

Capacity at a K/V budget of `budget_tokens` positions (every layer): for mlx-lm's caches it is
arithmetic, a request holding its whole prompt and output, rounded up to KVCache's 256-position
steps; for the paged store it is measured, the most requests running at once when the whole trace
arrives together on a pool of exactly that budget.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from pagedkv.config import ceil_div

QUICK = dict(requests=12, systems=2, system=256, suffix=32, output=32, block_size=16,
             budget_tokens=4096, arrive_every=2)  # fmt: skip
FULL = dict(requests=64, systems=2, system=2048, suffix=128, output=256, block_size=16,
            budget_tokens=65536, arrive_every=1)  # fmt: skip


@dataclass
class Run:
    tokens: dict[int, list[int]]
    tok_s: float
    ttft_ms: float
    peak_kv_bytes: int
    most_running: int


def make_trace(cfg: dict, count: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    systems = [[rng.randrange(vocab) for _ in range(cfg["system"])] for _ in range(cfg["systems"])]
    trace = []
    for i in range(count):
        suffix = [rng.randrange(vocab) for _ in range(rng.randint(1, cfg["suffix"]))]
        trace.append((systems[i % len(systems)] + suffix, rng.randint(1, cfg["output"])))
    return trace


def run_trace(model, trace, cfg: dict, paged: bool, arrive_every: int, num_blocks=None) -> Run:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from pagedkv.mlx_lm import PagedKVStore
    from pagedkv.mlx_lm.admission import Admission, AdmittingBatchGenerator
    from pagedkv.mlx_lm.batch import RequestPool

    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    kw = dict(sampler=greedy, completion_batch_size=len(trace), prefill_batch_size=8)
    if paged:
        blocks = num_blocks or 4 * cfg["budget_tokens"] // cfg["block_size"]
        store = PagedKVStore.for_model(model, num_blocks=blocks, block_size=cfg["block_size"])
        pool = RequestPool(store)
        admission = Admission(pool)
        gen = AdmittingBatchGenerator(model, admission=admission, **kw)
        per_block = sum(c.config.bytes_per_block for c in store.groups)
    else:
        gen = BatchGenerator(model, **kw)
    uids, inserted, first, tokens, done = [], {}, {}, {}, 0
    peak, most, step = 0, 0, 0
    started = time.perf_counter()
    while done < len(trace):
        if len(uids) < len(trace) and (arrive_every == 0 or step % arrive_every == 0):
            batch = trace[len(uids) :] if arrive_every == 0 else [trace[len(uids)]]
            for prompt, max_tokens in batch:
                if paged:
                    request = admission.open(prompt)
                    caches = [pool.caches([request])]
                    feed = prompt[request.cached_tokens :]
                    uid = gen.insert([feed], [max_tokens], caches=caches)[0]
                else:
                    uid = gen.insert([prompt], [max_tokens])[0]
                uids.append(uid)
                inserted[uid] = time.perf_counter()
        _, responses = gen.next()
        now = time.perf_counter()
        for r in responses:
            first.setdefault(r.uid, now)
            tokens.setdefault(uids.index(r.uid), []).append(r.token)
            done += r.finish_reason is not None
        most = max(most, len(gen._prompt_batch) + len(gen._generation_batch))
        if paged:
            peak = max(peak, sum(c.stats().in_use_blocks for c in store.groups) * per_block)
        else:
            peak = max(peak, gen.prompt_cache_nbytes)
        step += 1
    elapsed = time.perf_counter() - started
    gen.close()
    if paged:
        store.close()
    ttft = sum(first[u] - inserted[u] for u in uids) / len(uids)
    generated = sum(len(t) for t in tokens.values())
    return Run(tokens, generated / elapsed, 1000 * ttft, peak, most)


def serve_bench(model, cfg: dict) -> list[list]:
    """Rows: (caches, requests, tok/s, TTFT ms, peak K/V MiB, fit at budget, same tokens)."""
    vocab = model.args.vocab_size
    trace = make_trace(cfg, cfg["requests"], vocab)
    dense = run_trace(model, trace, cfg, paged=False, arrive_every=cfg["arrive_every"])
    paged = run_trace(model, trace, cfg, paged=True, arrive_every=cfg["arrive_every"])
    same = dense.tokens == paged.tokens
    # Capacity at the budget: arithmetic for mlx-lm's caches, measured for the paged pool.
    per_position = _bytes_per_position(model)
    longest = cfg["system"] + cfg["suffix"] + cfg["output"]
    dense_fit = cfg["budget_tokens"] // (ceil_div(longest, 256) * 256)
    crowd = make_trace(cfg, max(8 * dense_fit, 16), vocab, seed=1)
    budget_blocks = cfg["budget_tokens"] // cfg["block_size"]
    fit = run_trace(model, crowd, cfg, paged=True, arrive_every=0, num_blocks=budget_blocks)
    mib = 1 / 2**20
    budget_mib = cfg["budget_tokens"] * per_position * mib
    return [
        ["mlx-lm", len(trace), dense.tok_s, dense.ttft_ms, dense.peak_kv_bytes * mib,
         round(budget_mib, 2), dense_fit, same],
        ["pagedkv", len(trace), paged.tok_s, paged.ttft_ms, paged.peak_kv_bytes * mib,
         round(budget_mib, 2), fit.most_running, same],
    ]  # fmt: skip


def _bytes_per_position(model) -> int:
    """K/V bytes one position takes in every layer of mlx-lm's caches."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[1]]), cache=cache)
    return sum(c.nbytes // c.keys.shape[2] for c in cache if getattr(c, "keys", None) is not None)
