"""Admission cost against the number of cached blocks (issue 12): it must not grow with the pool.

A pool of N blocks is filled with a full prefix index: 8 system prompts of 4 blocks, under each of
which requests of 60 private blocks were prefilled, committed and freed, until no block is free.
32 live requests then hold a system prompt and 4 indexed blocks each, so referenced nodes sit deep
in the trie. Timed, per call (metadata only, no K/V):

- `can_add_sequence` of a prompt on a system prompt + 4 new blocks (it needs eviction);
- one admission round: `add_sequence` of such a prompt (evicts 4 LRU leaves), `commit`, `free`, so
  the index stays full and the next round evicts again;
- `can_extend` of a live request by 64 tokens.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from pagedkv.config import Config

BLOCK = 16
SYSTEM_BLOCKS, REQUEST_BLOCKS, SYSTEMS, LIVE = 4, 60, 8, 32
SIZES = (2048, 8192, 32768, 131072)


@dataclass
class AdmissionCell:
    num_blocks: int
    cached_blocks: int
    can_add_us: float
    add_round_us: float
    can_extend_us: float


class Workload:
    """A cache with a full index and a stream of fresh prompts for admission rounds."""

    def __init__(self, cache_class, num_blocks: int) -> None:
        self.cache = cache_class(Config(num_blocks=num_blocks, block_size=BLOCK, store_kv=False))
        self.systems = [
            [10_000 * (s + 1) + t for t in range(SYSTEM_BLOCKS * BLOCK)] for s in range(SYSTEMS)
        ]
        self.fresh = 10**8  # a counter making every new prompt's tail unique
        request = 0
        while self.cache.stats().free_blocks:  # fill the pool with cached blocks
            tail_blocks = min(REQUEST_BLOCKS, self.cache.stats().free_blocks)
            self.admit(request % SYSTEMS, tail_blocks * BLOCK, keep=False)
            request += 1
        self.live = [self.admit(i % SYSTEMS, 4 * BLOCK, keep=True) for i in range(LIVE)]

    def prompt(self, system: int, tail: int) -> list[int]:
        self.fresh += tail
        return self.systems[system] + list(range(self.fresh - tail, self.fresh))

    def admit(self, system: int, tail: int, keep: bool) -> int:
        seq, _ = self.cache.add_sequence(self.prompt(system, tail))
        self.cache.commit(seq)
        if not keep:
            self.cache.free(seq)
        return seq

    def can_add(self) -> bool:
        return self.cache.can_add_sequence(self.prompt(0, 4 * BLOCK))

    def add_round(self) -> None:
        self.admit(1, 4 * BLOCK, keep=False)

    def can_extend(self) -> bool:
        return self.cache.can_extend(self.live[0], 64)


def _time_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def measure(cache_class=None, sizes=SIZES, repeats: int = 200) -> list[AdmissionCell]:
    """Every size built first, then timed in alternation (size A, B, C, D, A, ...) so drift on a
    busy host hits them alike. Returns one cell per size, medians in microseconds."""
    if cache_class is None:
        from pagedkv.mlx_backend import PagedCache as cache_class
    workloads = {n: Workload(cache_class, n) for n in sizes}
    ops = {"can_add": "can_add", "add_round": "add_round", "can_extend": "can_extend"}
    samples: dict[tuple[int, str], list[float]] = {(n, op): [] for n in sizes for op in ops}
    for _ in range(repeats // 10):
        for n, workload in workloads.items():
            for op in ops:
                samples[(n, op)].append(_time_us(getattr(workload, op), 10))
    cells = []
    for n, workload in workloads.items():
        workload.cache.check_invariants()
        cells.append(
            AdmissionCell(
                num_blocks=n,
                cached_blocks=workload.cache.stats().cached_blocks,
                can_add_us=statistics.median(samples[(n, "can_add")]),
                add_round_us=statistics.median(samples[(n, "add_round")]),
                can_extend_us=statistics.median(samples[(n, "can_extend")]),
            )
        )
    return cells
