"""Capacity admission for mlx-lm's batch loop: reserve ahead, so decoding never runs out of blocks.

Policy (docs/adr/0003-admission.md): a request is admitted into `BatchGenerator`'s prompt batch
only when the pool can promise it every block it may ever need, its prompt plus `max_tokens`
generated positions plus one block for a copied shared tail, on top of what every admitted request
was already promised. Admitted requests therefore never meet a full pool mid-prefill or mid-decode,
and nothing is ever preempted. A request that does not fit waits, first come first served (the
head of the queue blocks the rest, so a long request is not starved by short ones). A request
whose promise exceeds the whole pool is admitted with `max_tokens` cut to what fits (it finishes
with reason "length"); a prompt that alone exceeds the pool can never run and is refused.

    gen = AdmittingBatchGenerator(model, admission=Admission(pool), ...)

`AdmittingBatchGenerator` is mlx-lm's `BatchGenerator` with one step added before each of its
own: the gate. `pagedkv serve` hands it to mlx-lm's server in place of `BatchGenerator`.
"""

from __future__ import annotations

import logging

from mlx_lm.generate import BatchGenerator

from pagedkv.config import ceil_div
from pagedkv.errors import OutOfBlocksError
from pagedkv.mlx_lm.batch import Request, RequestPool

log = logging.getLogger("pagedkv.serve")


def require_fits(prompt_tokens: int, block_size: int, num_blocks: int) -> None:
    """Raises OutOfBlocksError when a prompt alone (plus a block for a copied shared tail) can
    never fit a pool of `num_blocks` blocks, whatever else is running."""
    if ceil_div(prompt_tokens, block_size) + 1 > num_blocks:
        raise OutOfBlocksError(
            f"a {prompt_tokens}-token prompt can never fit the {num_blocks}-block pool of "
            f"{block_size}-token blocks; shorten it or start the server with more --num-blocks."
        )


class Admission:
    """Queues requests (no blocks held), opens and admits them when their whole budget fits."""

    def __init__(self, pool: RequestPool) -> None:
        self.pool = pool
        self.store = pool.store
        self.counts = dict(
            queued=0,
            admitted=0,
            preempted=0,
            clamped=0,
            refused=0,
            cancelled=0,
            waited_for_prefix=0,
        )

    def open(self, tokens: list[int]) -> Request:
        """A queued request for `tokens`, holding no blocks until admitted; its `cached_tokens`
        is the prefix hit the store offers now (feed the prompt from there)."""
        self.pool.reap()
        self.counts["queued"] += 1
        return self.pool.queue(tokens)

    def gate(self, queue) -> list:
        """Splits mlx-lm's queue of unprocessed sequences `(uid, segments, max_tokens, caches,
        ...)` into those admitted now (in order) and those that wait (returned, in order)."""
        with self.store.lock:
            return self._gate(queue)

    def _gate(self, queue) -> list:
        self.pool.reap()
        admitted, waiting = [], []
        leaders = [r for r in list(self.pool.live) if r.admitted and not r.committed]
        for item in queue:
            request = _request_of(item[3])
            if waiting or (
                request is not None
                and (self._follows(request, leaders) or not self._admit(request, item))
            ):
                waiting.append(item)
            else:
                admitted.append(item)
                if request is not None and not request.committed:
                    leaders.append(request)
        return admitted, waiting

    def _follows(self, request: Request, leaders: list[Request]) -> bool:
        """Whether a queued request should wait for a running one to publish its prompt: they
        share at least one more full block than the store holds now. Admitted together, both
        would prefill (and hold) that prefix; one step later the second hits it."""
        if request.seqs is not None or not self.store.prefix_sharing:
            return False
        size, prompt = self.store.config.block_size, request.prompt
        cached = None
        for leader in leaders:
            if leader is request:
                continue
            shared = 0
            for a, b in zip(prompt, leader.prompt):
                if a != b:
                    break
                shared += 1
            if shared < size:
                continue
            if cached is None:
                cached = min(cache.prefix_match(prompt) for cache in self.store.groups)
            if min(shared, len(prompt) - 1) // size * size > cached:
                self.counts["waited_for_prefix"] += 1
                return True
        return False

    def _admit(self, request: Request, item) -> bool:
        if request.admitted:
            return True
        size = self.store.config.block_size
        whole = self.store.config.num_blocks
        max_tokens = item[2]
        try:
            require_fits(len(request.prompt), size, whole)
        except OutOfBlocksError:
            self.counts["refused"] += 1
            raise
        cut = min(max_tokens, (whole - 1) * size - len(request.prompt))
        if cut < max_tokens:
            self.counts["clamped"] += 1
            log.warning("pagedkv: max_tokens %d cut to %d to fit the pool", max_tokens, cut)
            item[2] = cut
        request.max_tokens = cut
        if any(self._free(g) < self._need(g, request) for g in range(len(self.store.groups))):
            return False
        if request.seqs is None:
            expected = request.cached_tokens
            try:
                cached = self.pool.open_queued(request)
            except OutOfBlocksError:
                return False
            groups = range(len(self.store.groups))
            if any(self._free(g) < self._need(g, request) for g in groups):
                # the hit blocks it now pins were counted as evictable: the promise does not hold
                self.pool.unopen(request, expected)
                return False
            if cached != expected:  # the feed mlx-lm holds starts at `expected`: move it
                _refeed(item, request.prompt, expected, cached)
        request.admitted = True
        self.counts["admitted"] += 1
        return True

    def _promised(self, group: int) -> int:
        live = list(self.pool.live)
        return sum(self._need(group, r) for r in live if r.admitted and not r.closed)

    def _need(self, group: int, request: Request) -> int:
        """Blocks `request` may still take in a group: its whole budget, less what it holds."""
        size = self.store.config.block_size
        end = len(request.prompt) + (request.max_tokens or 0)
        if request.seqs is None:  # optimistic: the prefix hit it expects (checked once opened)
            return ceil_div(end, size) + 1 - request.cached_tokens // size
        held = len(self.store.groups[group].block_table_array(request.seqs[group]))
        return max(0, ceil_div(end, size) + 1 - held)

    def _free(self, group: int) -> int:
        return self.store.groups[group].blocks_available() - self._promised(group)


class AdmittingBatchGenerator(BatchGenerator):
    """mlx-lm's BatchGenerator, admitting paged requests only when the pool can promise them
    their whole budget (see module docstring). Sequences with other caches pass straight on."""

    def __init__(self, model, *, admission, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self._admission = admission  # an Admission, or a callable returning one (or None)

    @property
    def admission(self) -> Admission | None:
        a = self._admission
        return a if isinstance(a, Admission) or a is None else a()

    def remove(self, uids, return_prompt_caches=False):
        """mlx-lm's remove (a cancelled request: a client went away); counted as cancelled."""
        admission = self.admission
        if admission is not None:
            admission.counts["cancelled"] += len(self._find_uids(uids))
        return super().remove(uids, return_prompt_caches)

    def _next(self):
        admission = self.admission
        if admission is None or not self._unprocessed_sequences:
            return super()._next()
        queue = [list(item) for item in self._unprocessed_sequences]
        admitted, waiting = admission.gate(queue)
        self._unprocessed_sequences.clear()
        self._unprocessed_sequences.extend(tuple(item) for item in admitted)
        try:
            return super()._next()
        finally:
            self._unprocessed_sequences.extend(tuple(item) for item in waiting)


def _refeed(item, prompt: list[int], expected: int, cached: int) -> None:
    """Makes a queued item feed the prompt from `cached` instead of `expected`: tokens put back
    in front when cached blocks were evicted, dropped from the front when a request admitted
    earlier published more of this prompt. The last segment (the last prompt token, which mlx-lm
    feeds when generation starts) is never touched: a prefix hit always leaves a token."""
    segments = [list(segment) for segment in item[1]]
    if cached < expected:
        segments[0] = prompt[cached:expected] + segments[0]
    else:
        drop = cached - expected
        while drop:
            take = min(drop, len(segments[0]))
            segments[0] = segments[0][take:]
            drop -= take
            if not segments[0]:
                segments.pop(0)
    item[1] = segments
    if len(item[4]) == expected:  # the tokens mlx-lm believes are in the cache
        item[4] = list(prompt[:cached])


def _request_of(caches) -> Request | None:
    for cache in caches or ():
        sessions = getattr(cache, "sessions", None)
        if sessions and isinstance(sessions[0], Request):
            return sessions[0]
    return None
