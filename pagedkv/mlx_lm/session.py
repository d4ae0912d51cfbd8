"""A session: one request's sequence in the store, its prompt, and each layer's progress."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedkv.errors import InvalidArgumentError

if TYPE_CHECKING:
    from pagedkv.mlx_lm.store import PagedKVStore

UNKNOWN_TOKEN = 2**31 - 1  # stands for generated tokens the cache never sees; never committed


class Session:
    """One request: its sequence in the store, its prompt, and how far each layer has written."""

    def __init__(self, store: PagedKVStore, seq: int, prompt: list[int], cached: int) -> None:
        self.store = store
        self.seq = seq
        self.prompt = prompt
        self.cached_tokens = cached
        self.offsets = [cached] * store.config.num_layers
        self.committed = False
        self.closed = False
        # One object per entry of the model's make_cache(): paged layers, None for layers that
        # read another layer's K/V, and mlx-lm's own objects for recurrent state.
        self.caches = store.caches_for([self])

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
            self.store.cache.trim(self.seq, length - furthest)
        del self.prompt[furthest:]

    def close(self) -> None:
        """Frees the sequence; its committed prompt blocks stay cached for later requests."""
        if not self.closed:
            self.store.cache.free(self.seq)
            self.closed = True
