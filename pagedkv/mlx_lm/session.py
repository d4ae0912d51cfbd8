"""A session: one request's sequence in the store, its prompt, and each layer's progress."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedkv.errors import InvalidArgumentError

if TYPE_CHECKING:
    from pagedkv.mlx_lm.store import PagedKVStore

UNKNOWN_TOKEN = 2**31 - 1  # stands for generated tokens the cache never sees; never committed


class Session:
    """One request: its sequence in the store, its prompt, and how far each layer has written."""

    def __init__(
        self, store: PagedKVStore, seqs: list[int], prompt: list[int], cached: int
    ) -> None:
        self.store = store
        self.seqs = seqs  # one sequence per cache of the store (full attention, each window)
        self.prompt = prompt
        self.cached_tokens = cached
        self.offsets = [cached] * len(store.layer_shapes)  # per paged layer (PagedLayerCache.slot)
        self.committed = False
        self.closed = False
        # One object per entry of the model's make_cache(): paged layers, None for layers that
        # read another layer's K/V, and mlx-lm's own objects for recurrent state.
        self.caches = store.caches_for([self])

    @property
    def seq(self) -> int:
        """The sequence handle in `store.cache` (the first group's cache)."""
        return self.seqs[0]

    @property
    def remaining_prompt(self) -> list[int]:
        """The prompt tokens the model must still prefill (never empty: rule 3)."""
        return self.prompt[self.cached_tokens :]

    def _require_open(self) -> None:
        if self.closed:
            raise InvalidArgumentError(f"session of sequence {self.seq} is closed.")

    def _tokens_for(self, start: int, stop: int) -> list[int]:
        known = self.prompt[start:stop]
        return known + [UNKNOWN_TOKEN] * (stop - start - len(known))

    def _sync_length(self) -> None:
        """Trims the stored sequence to the furthest layer once every layer has trimmed. Prompt
        tokens past the new end are forgotten: whatever is fed there next is not known to be them."""
        furthest = max(self.offsets)
        length = self.store.cache.sequence_length(self.seq)
        if furthest < length:
            for cache, seq in zip(self.store.groups, self.seqs):
                cache.trim(seq, length - furthest)
        del self.prompt[furthest:]

    def _check_trim_to(self, length: int) -> None:
        """Raises InvalidArgumentError, changing nothing, if a window cache could not trim this
        session back to `length` (its next query would need K/V the window released)."""
        for cache, seq in zip(self.store.groups, self.seqs):
            window = cache.config.window
            if window is None:
                continue
            table = cache.block_table_array(seq)
            held_from = int((table < 0).sum()) * cache.config.block_size
            if held_from and length - window < held_from:
                raise InvalidArgumentError(
                    f"trim back to {length} positions: the {window}-position window layers "
                    f"released K/V before position {held_from}; trim to at least "
                    f"{held_from + window} positions."
                )

    def close(self) -> None:
        """Frees the sequence; its committed prompt blocks stay cached for later requests."""
        if not self.closed:
            self.store.enter()  # the owner's lazy writes are scheduled before its blocks free
            for cache, seq in zip(self.store.groups, self.seqs):
                cache.free(seq)
            self.closed = True
