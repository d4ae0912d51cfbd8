"""Per-layer K/V shapes and the activation dtype, learned from the model itself.

Argument names differ between architectures (`num_key_value_heads`, `n_head`, `num_kv_heads`,
per-layer lists, nested `text_config`, MLA's latent sizes), so pagedkv does not read them: it runs
the model once on one token with recording caches and keeps what every cache entry was handed —
`keys [B, kv_heads, L, k_dim]`, `values [B, kv_heads, L, v_dim]` and their dtype. The pass costs one
decode step of the model, once per store.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from pagedkv.errors import UnsupportedModelError
from pagedkv.mlx_lm.kinds import LayerKind

_DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class LayerShape:
    """What one cache entry stores per position: K and V heads and sizes (V may differ: MLA)."""

    k_heads: int
    k_dim: int
    v_heads: int
    v_dim: int
    dtype: str


class _RecordingCache(KVCache):
    """A plain KVCache that remembers the shapes it was handed (a KVCache, so isinstance holds)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        self.windows: list[int] = []  # window_size of every make_mask call

    def make_mask(self, *args, window_size=None, **kwargs):
        if window_size is not None:
            self.windows.append(window_size)
        return super().make_mask(*args, window_size=window_size, **kwargs)

    def update_and_fetch(self, keys, values):
        self.calls.append((tuple(keys.shape), tuple(values.shape), keys.dtype, values.dtype))
        return super().update_and_fetch(keys, values)


def _shape_of(index: int, calls: list[tuple]) -> LayerShape | None:
    """The entry's shape from its recorded calls; None when the model never used it."""
    if not calls:
        return None
    if len(calls) > 1:
        raise UnsupportedModelError(
            f"cache entry {index} is updated {len(calls)} times in one forward pass; pagedkv "
            "keeps one K/V history per entry. Use mlx-lm's own cache for this model."
        )
    (_, kh, _, kd), (_, vh, _, vd), kdt, vdt = calls[0]
    if kdt != vdt or kdt not in _DTYPE_NAMES:
        raise UnsupportedModelError(
            f"cache entry {index} receives keys of {kdt} and values of {vdt}; pagedkv pools "
            f"hold one of {sorted(_DTYPE_NAMES.values())} for both."
        )
    return LayerShape(kh, kd, vh, vd, _DTYPE_NAMES[kdt])


def discover_shapes(model, entries: list, kinds: list[LayerKind]) -> list[LayerShape | None]:
    """Runs `model` on one token with recording caches in place of the paged entries.

    Args:
        model: the mlx-lm model.
        entries: a fresh `make_cache()` list (recurrent entries are used as they are).
        kinds: the kind of every entry (kinds.classify_all).
    Returns:
        per entry, its LayerShape, or None for entries that are not paged or never used.
    """
    probes = [_RecordingCache() if k.paged else entry for entry, k in zip(entries, kinds)]
    try:
        mx.eval(model(mx.array([[0]]), cache=probes))
    except Exception as error:  # the model cannot run on plain K/V caches: refuse, say why
        raise UnsupportedModelError(
            f"a one-token forward pass with plain K/V caches failed ({type(error).__name__}: "
            f"{error}); pagedkv cannot learn this model's K/V shapes."
        ) from error
    for i, (probe, k) in enumerate(zip(probes, kinds)):
        if k.window is not None and any(w > k.window for w in probe.windows):
            raise UnsupportedModelError(
                f"cache entry {i} keeps a window of {k.window} positions but the model masks "
                f"with a window of {max(probe.windows)}; mlx-lm's own output then depends on how "
                "the prompt is chunked, so no paged cache can match it. Use mlx-lm's own cache."
            )
    return [
        _shape_of(i, probe.calls) if k.paged else None
        for i, (probe, k) in enumerate(zip(probes, kinds))
    ]
