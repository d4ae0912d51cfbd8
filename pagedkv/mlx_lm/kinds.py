"""What each entry of an mlx-lm model's cache list is, read from `model.make_cache()`.

mlx-lm models that need more than one K/V cache per layer say so through `make_cache()`; the
entries tell the adapter what every layer needs:

| mlx-lm entry | kind | what the session gives the model |
|---|---|---|
| `KVCache` | `full` | a `PagedLayerCache` (full-attention K/V in the pool) |
| `RotatingKVCache(max_size, keep=0)` | `window` | a `WindowLayerCache` (pool + sliding-window mask) |
| `None` | `shared` | `None`: the layer reads another layer's K/V (gemma4-style), stores nothing |
| `ArraysCache` and subclasses | `recurrent` | a fresh mlx-lm object of the same kind, per session |

Everything else cannot be run exactly by the paged pool and is refused when the store is built,
naming the layer and the feature: `RotatingKVCache` with sink tokens (`keep > 0`), `ChunkedKVCache`
(chunked attention), `CacheList` (several caches in one layer), `QuantizedKVCache`, and any cache
class pagedkv does not know. Exact type checks, not `isinstance`: a subclass of `KVCache` may change
what attention sees (`ChunkedKVCache` does).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

from pagedkv.errors import UnsupportedModelError

FULL, WINDOW, SHARED, RECURRENT = "full", "window", "shared", "recurrent"
PAGED_KINDS = (FULL, WINDOW)

_REFUSED = {
    "ChunkedKVCache": "chunked attention (ChunkedKVCache): keys before the chunk start are dropped",
    "CacheList": "several caches in one layer (CacheList)",
    "QuantizedKVCache": "a quantized K/V cache (QuantizedKVCache)",
    "ConcatenateKVCache": "a ConcatenateKVCache",
}


@dataclass(frozen=True)
class LayerKind:
    """The kind of one entry of `model.make_cache()`; `window` is set for `window` entries."""

    kind: str
    window: int | None = None

    @property
    def paged(self) -> bool:
        return self.kind in PAGED_KINDS


def default_caches(model) -> list:
    """`model.make_cache()` when the model has one, else one `KVCache` per layer (as mlx-lm)."""
    if hasattr(model, "make_cache"):
        return list(model.make_cache())
    if not hasattr(model, "layers"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has neither make_cache() nor layers; pagedkv cannot tell "
            "which caches it needs. Pass an mlx-lm model."
        )
    return [KVCache() for _ in model.layers]


def classify(entry, index: int) -> LayerKind:
    """The kind of cache entry `index`; raises UnsupportedModelError for what cannot run exactly."""
    if entry is None:
        return LayerKind(SHARED)
    if type(entry) is KVCache:
        return LayerKind(FULL)
    if type(entry) is RotatingKVCache:
        if entry.keep:  # StreamingLLM-style sinks: attention sees the first tokens + the window
            raise UnsupportedModelError(
                f"cache entry {index} is a RotatingKVCache keeping {entry.keep} sink tokens; "
                "pagedkv's window attention has no sink tokens. Use mlx-lm's own cache."
            )
        return LayerKind(WINDOW, window=int(entry.max_size))
    if isinstance(entry, ArraysCache):  # recurrent state (conv + SSM, linear attention, ...)
        return LayerKind(RECURRENT)
    name = type(entry).__name__
    feature = _REFUSED.get(name, f"a cache class pagedkv does not know ({name})")
    raise UnsupportedModelError(
        f"cache entry {index} uses {feature}; pagedkv cannot run it exactly. "
        "Use mlx-lm's own cache for this model."
    )


def classify_all(entries: list) -> list[LayerKind]:
    """The kind of every entry, refusing the model at the first one that cannot run exactly."""
    kinds = [classify(entry, i) for i, entry in enumerate(entries)]
    if not any(k.paged for k in kinds):
        raise UnsupportedModelError(
            "this model keeps no attention K/V (every cache entry is recurrent or shared); "
            "there is nothing for pagedkv to page. Use mlx-lm's own cache."
        )
    return kinds
