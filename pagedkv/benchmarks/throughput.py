"""Model-level decode throughput: unmodified mlx-lm model code on the paged cache vs mlx-lm's caches.

Equal cells: B requests share a prefix and have private suffixes of equal length, so the dense side
is one plain `KVCache` batch. Ragged cells: private prompts whose lengths differ up to 2x, so the
dense side is mlx-lm's left-padded, masked `BatchKVCache` (what its BatchGenerator uses). The paged
side prefills each request on its own (a shared prefix is computed once, then matched) and decodes
through `store.batch`, with attention routed (the fused kernel on a GPU) and, for comparison, on
gather -> SDPA. Every side decodes greedily as mlx-lm's generate_step does (the next step's graph
is built while the device runs the current one): 3 untimed warm-up steps, then rounds of `steps`
timed steps, the sides taking turns round by round; each side's median round is reported, and
each ratio is the median over rounds of the sides' rates within one round (drift between rounds,
common on a shared machine, cancels).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pagedkv.config import ceil_div


@dataclass
class ThroughputCell:
    model: str
    batch: int
    prefix: int  # shared prefix length; ragged: the longest private prompt
    ragged: bool  # private prompts of prefix/2 .. prefix tokens (the dense side needs a mask)
    steps: int
    dense_tok_s: float
    paged_tok_s: float  # routed attention: the fused kernel where the device has one
    paged_gather_tok_s: float  # the same store with route_attention=False: gather -> SDPA
    same_tokens: bool
    ratio: float  # paged / dense: the median over rounds of the two sides' rates in one round
    gather_ratio: float  # paged (gather) / dense, likewise


def pipelined_decode(call, first, steps: int, warmup: int = 3):
    """Greedy decoding as mlx-lm's generate_step runs it: step n+1's graph is built (host work)
    while step n runs on the device. `warmup` untimed steps first (kernel compiles), then `steps`
    timed ones. Returns (steps per second, tokens [B, warmup + steps])."""
    import mlx.core as mx

    def step(tokens):
        return mx.argmax(call(tokens[:, None])[:, -1], axis=-1)

    out, tokens = [], first
    for _ in range(warmup):
        tokens = step(tokens)
        mx.eval(tokens)
        out.append(tokens)
    mx.synchronize()
    start = time.perf_counter()
    pending = step(tokens)
    mx.async_eval(pending)
    for _ in range(steps - 1):
        following = step(pending)
        mx.async_eval(following)
        out.append(pending)
        pending = following
    mx.eval(pending)
    out.append(pending)
    mx.synchronize()
    elapsed = time.perf_counter() - start
    return steps / elapsed, mx.stack(out, axis=1).tolist()


def prompts_for(vocab: int, batch: int, prefix: int, ragged: bool) -> list[list[int]]:
    """Shared prefix + 16 private tokens each; ragged: private prompts of prefix/2 .. prefix."""
    if ragged:
        sizes = [prefix // 2 + (prefix // 2) * b // max(1, batch - 1) for b in range(batch)]
        return [[(53 * b + 11 * j + 5) % vocab for j in range(n)] for b, n in enumerate(sizes)]
    shared = [(31 * i + 7) % vocab for i in range(prefix)]
    return [shared + [(97 * b + j) % vocab for j in range(16)] for b in range(batch)]


def dense_side(model, prompts):
    """mlx-lm's own caches, prefilled: KVCache for equal lengths, else BatchKVCache (left-padded,
    masked). Returns (one decode call, the first tokens)."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

    longest = max(len(p) for p in prompts)
    padding = [longest - len(p) for p in prompts]
    if any(padding):
        cache = [BatchKVCache(padding) for _ in model.layers]
        tokens = mx.array([[0] * pad + p for pad, p in zip(padding, prompts)])
    else:
        cache, tokens = make_prompt_cache(model), mx.array(prompts)
    logits = model(tokens, cache=cache)
    return (lambda t: model(t, cache=cache)), mx.argmax(logits[:, -1], axis=-1)


def paged_side(model, prompts, tokens_ahead: int, block_size: int, route: bool):
    """A paged store, each request prefilled alone (shared prefixes matched), one batch.
    Returns (one decode call, the first tokens, the store)."""
    import mlx.core as mx

    from pagedkv.mlx_lm import PagedKVStore

    blocks = sum(ceil_div(len(p) + tokens_ahead, block_size) for p in prompts) + 8
    store = PagedKVStore.for_model(
        model, num_blocks=blocks, block_size=block_size, route_attention=route
    )
    sessions, firsts = [], []
    for prompt in prompts:
        session = store.open(prompt)
        logits = model(mx.array(session.remaining_prompt)[None], cache=session.caches)
        firsts.append(mx.argmax(logits[0, -1]))
        sessions.append(session)
    caches = store.batch(sessions)
    return (lambda t: model(t, cache=caches)), mx.stack(firsts), store


def decode_throughput(
    model,
    name: str,
    batch: int,
    prefix: int,
    steps: int,
    ragged: bool = False,
    block_size: int = 16,
    repeats: int = 3,
) -> ThroughputCell:
    """One cell: dense, paged with routed attention (the kernel on a GPU) and paged on gather,
    all prefilled first, then `repeats` rounds of `steps` timed decode steps taken in turn (so
    drift on a shared machine hits every side alike); each side's median rate is reported."""
    import statistics

    import mlx.core as mx

    prompts = prompts_for(model.args.vocab_size, batch, prefix, ragged)
    ahead = repeats * (steps + 3) + 4
    dense = dense_side(model, prompts)
    routed_call, routed_first, routed_store = paged_side(model, prompts, ahead, block_size, True)
    gather_call, gather_first, gather_store = paged_side(model, prompts, ahead, block_size, False)
    sides = {
        "dense": [dense[0], dense[1]],
        "routed": [routed_call, routed_first],
        "gather": [gather_call, gather_first],
    }
    rates: dict[str, list[float]] = {name: [] for name in sides}
    first_tokens: dict[str, list] = {}
    for round_ in range(repeats):
        for side, state in sides.items():
            rate, tokens = pipelined_decode(
                state[0], state[1], steps, warmup=3 if round_ == 0 else 0
            )
            rates[side].append(rate)
            first_tokens.setdefault(side, tokens)
            state[1] = mx.array([row[-1] for row in tokens])
    routed_store.close()
    gather_store.close()
    median = {side: batch * statistics.median(r) for side, r in rates.items()}
    ratios = {  # per round: the sides ran back to back, so drift between rounds cancels
        side: statistics.median(a / d for a, d in zip(rates[side], rates["dense"]))
        for side in ("routed", "gather")
    }
    return ThroughputCell(
        name, batch, prefix, ragged, steps, median["dense"], median["routed"], median["gather"],
        first_tokens["dense"] == first_tokens["routed"], ratios["routed"], ratios["gather"],
    )  # fmt: skip
