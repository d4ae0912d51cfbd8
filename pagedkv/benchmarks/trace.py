"""A synthetic serving trace through the backend in metadata-only mode (issue 12): flat cost is the
claim. Requests arrive on system prompts drawn by a Zipf law, are admitted while `can_add_sequence`
says yes (it must then succeed), decode in one `decode_step` per tick, sometimes fork (parallel
sampling), speculate and rewind (extend by drafts, trim the rejected ones) or abort, and publish
their blocks when they finish. Every window of requests reports the cost per request and per
metadata operation, the process's resident memory and the cache's state, after check_invariants().
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pagedkv.config import Config
from pagedkv.errors import OutOfBlocksError

BLOCK, VOCAB, SYSTEMS, MAX_LIVE = 16, 32000, 64, 64


@dataclass
class Window:
    requests: int  # requests admitted so far
    seconds: float
    us_per_request: float
    us_per_op: float
    rss_mib: float
    live: int
    cached_blocks: int
    evictions: int
    hit_pct: float  # prompt tokens served from the prefix index, this window
    forks: int
    rewinds: int
    aborts: int
    preempted: int


def rss_mib() -> float:
    """Resident set size now (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


class Trace:
    def __init__(self, cache_class, num_blocks: int, seed: int = 0) -> None:
        self.cache = cache_class(Config(num_blocks=num_blocks, block_size=BLOCK, store_kv=False))
        self.rng = np.random.default_rng(seed)
        lengths = self.rng.integers(8, 33, SYSTEMS) * BLOCK  # 128..512-token system prompts
        self.systems = [self.rng.integers(0, VOCAB, n).tolist() for n in lengths]
        weights = 1.0 / np.arange(1, SYSTEMS + 1) ** 1.1  # Zipf: a few prompts dominate
        self.weights = weights / weights.sum()
        self.live: dict[int, int] = {}  # sequence -> tokens still to generate
        self.counts = dict(ops=0, forks=0, rewinds=0, aborts=0, preempted=0, admitted=0)

    def prompt(self) -> list[int]:
        system = self.systems[self.rng.choice(SYSTEMS, p=self.weights)]
        return system + self.rng.integers(0, VOCAB, int(self.rng.integers(16, 257))).tolist()

    def admit(self) -> bool:
        cache, rng, counts = self.cache, self.rng, self.counts
        prompt = self.prompt()
        counts["ops"] += 1
        if not cache.can_add_sequence(prompt):
            return False
        seq, _ = cache.add_sequence(prompt)  # can_add said yes: it must succeed
        cache.commit(seq)  # the prefill is done: publish the prompt's blocks
        counts["ops"] += 2
        counts["admitted"] += 1
        self.live[seq] = int(rng.integers(16, 129))
        if rng.random() < 0.05:  # parallel sampling: two more samples of the same prompt
            for _ in range(2):
                self.live[cache.fork(seq)] = int(rng.integers(16, 129))
            counts["forks"] += 2
            counts["ops"] += 2
        return True

    def finish(self, seq: int, publish: bool) -> None:
        if publish:
            self.cache.commit(seq)
            self.counts["ops"] += 1
        self.cache.free(seq)
        self.counts["ops"] += 1
        del self.live[seq]

    def tick(self) -> None:
        cache, rng, counts = self.cache, self.rng, self.counts
        seqs = list(self.live)
        try:
            cache.decode_step(seqs, rng.integers(0, VOCAB, len(seqs)).tolist())
            counts["ops"] += 1
        except OutOfBlocksError:  # preempt the newest request and try again next tick
            self.finish(seqs[-1], publish=False)
            counts["preempted"] += 1
            return
        for seq in seqs:
            self.live[seq] -= 1
            draw = rng.random()
            if draw < 0.02 and cache.can_extend(seq, 4):  # speculate 4 drafts, keep some
                cache.extend(seq, rng.integers(0, VOCAB, 4).tolist())
                cache.trim(seq, int(rng.integers(0, 5)))
                counts["rewinds"] += 1
                counts["ops"] += 3
            elif draw < 0.0025 + 0.02:
                self.finish(seq, publish=False)
                counts["aborts"] += 1
                continue
            if self.live[seq] <= 0:
                self.finish(seq, publish=True)

    def run(self, requests: int, window: int):
        """Yields a Window every `window` admitted requests."""
        cache, counts = self.cache, self.counts
        start, last = time.perf_counter(), dict(counts)
        last_stats = cache.stats()
        while counts["admitted"] < requests:
            while len(self.live) < MAX_LIVE and counts["admitted"] < requests and self.admit():
                if counts["admitted"] % window == 0:
                    break
            if self.live:
                self.tick()
            if counts["admitted"] % window == 0 and counts["admitted"] != last["admitted"]:
                elapsed = time.perf_counter() - start
                cache.check_invariants()
                stats = cache.stats()
                prompt = stats.prompt_tokens - last_stats.prompt_tokens
                hits = stats.prefix_hit_tokens - last_stats.prefix_hit_tokens
                yield Window(
                    requests=counts["admitted"],
                    seconds=elapsed,
                    us_per_request=1e6 * elapsed / window,
                    us_per_op=1e6 * elapsed / max(1, counts["ops"] - last["ops"]),
                    rss_mib=rss_mib(),
                    live=len(self.live),
                    cached_blocks=stats.cached_blocks,
                    evictions=stats.evictions - last_stats.evictions,
                    hit_pct=100 * hits / max(1, prompt),
                    **{k: counts[k] - last[k] for k in ("forks", "rewinds", "aborts", "preempted")},
                )
                start, last, last_stats = time.perf_counter(), dict(counts), stats


def run_trace(requests: int = 100_000, window: int = 10_000, num_blocks: int = 16384):
    from pagedkv.mlx_backend import PagedCache

    trace = Trace(PagedCache, num_blocks)
    yield from trace.run(requests, window)
