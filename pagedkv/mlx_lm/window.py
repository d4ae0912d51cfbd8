"""Sliding-window layers: mlx-lm's `RotatingKVCache(max_size=W)` entries, over the paged pool.

A `RotatingKVCache` keeps the last W positions, so attention in that layer sees at most W keys
(the query's own included) whatever mask the model asks for. `WindowLayerCache` keeps the layer's
whole history in the pool and masks exactly the keys the rotating buffer would have dropped: the
same keys, so the same output. (The pool holds what the window can still see:) the window group's cache (`Config.window`) releases blocks that
fall wholly before the window (rule 10), so memory stays bounded as with `RotatingKVCache`.
"""

from __future__ import annotations

from pagedkv.mlx_lm.layer_cache import PagedLayerCache


class WindowLayerCache(PagedLayerCache):
    """mlx-lm's cache protocol for a `RotatingKVCache(max_size=W)` layer, over the pool.

    Each query sees the keys mlx-lm's rotating buffer would show it: the last W positions, its
    own included, narrowed further by a smaller `window_size` from the model. (A model asking for
    a window wider than W gets chunking-dependent output from mlx-lm itself; the store refuses it,
    shapes.py.)
    """

    def __init__(self, store, layer: int, sessions, window: int, group: int = 0) -> None:
        super().__init__(store, layer, sessions, group)
        self.window = window

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        offsets = [s.offsets[self.slot] for s in self.sessions]
        look_back = min(self.window, window_size or self.window)
        if max(offsets) + N <= look_back:  # every query sees its whole history, as in a full layer
            return super().make_mask(N, return_array)
        return super().make_mask(N, return_array, window_size=look_back)
