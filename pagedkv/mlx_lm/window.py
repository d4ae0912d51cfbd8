"""Sliding-window layers: mlx-lm's `RotatingKVCache(max_size=W)` entries, over the paged pool.

A `RotatingKVCache` keeps the last W positions, so attention in that layer sees at most W keys
(the query's own included) whatever mask the model asks for. `WindowLayerCache` keeps the layer's
whole history in the pool and masks keys at or before `query - W`: the same keys, so the same
output. The pool does not yet free blocks that fall before the window: a window layer holds its
whole history (memory grows with the sequence, unlike `RotatingKVCache`).
"""

from __future__ import annotations

from pagedkv.mlx_lm.layer_cache import PagedLayerCache


class WindowLayerCache(PagedLayerCache):
    """mlx-lm's cache protocol for a sliding-window layer (window `W` positions, query included)."""

    def __init__(self, store, layer: int, sessions, window: int) -> None:
        super().__init__(store, layer, sessions)
        self.window = window

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        window = self.window if window_size is None else min(window_size, self.window)
        if max(s.offsets[self.layer] for s in self.sessions) + N <= window:
            return super().make_mask(N, return_array)  # no key is outside any query's window
        return super().make_mask(N, return_array, window_size=window)
