"""Attention routing: mlx-lm models on a paged store decode through the fused paged kernel.

mlx-lm's attention layers call `scaled_dot_product_attention(queries, keys, values, cache=...,
scale=..., mask=..., sinks=...)`, a helper each model module imports by name from
`mlx_lm.models.base` (it already switches on the cache type for quantized caches). `route(model)`
replaces that name, in the model's own modules only, with `paged_sdpa`: for a `PagedLayerCache`
in decode it asks the cache to attend in place (`PagedLayerCache.routed_attention`); for anything
else, or whenever the call is not exactly what the cache can answer, it calls mlx-lm's function
unchanged. `unroute(model)` (or the store's `close`) puts the original back once no store uses
the module.

Why this never changes a model's output: during decode `update_and_fetch` returns the gathered
history as lazy MLX arrays to any caller that may read it. When the routed call answers, those
arrays are never evaluated (MLX computes only what an output depends on), so no gather runs; when
it does not — a model that calls `mx.fast.scaled_dot_product_attention` directly, transforms the
keys, passes a mask the cache did not make, or arguments the kernel lacks — the model uses them as
before. Building that lazy history is host time, though, so an attention function *proven* to
pass it straight to this helper (callers.py: its source, read once) gets two placeholders instead;
if the cache then cannot answer, `routed_attention` builds the real history in their place before
mlx-lm's function runs.
"""

from __future__ import annotations

import sys
import threading

from mlx_lm.models import base

_ORIGINAL = base.scaled_dot_product_attention
_LOCK = threading.Lock()
_USERS: dict[str, int] = {}  # module name -> routed models using it


def paged_sdpa(queries, keys, values, cache=None, scale=None, mask=None, sinks=None, **extra):
    """mlx-lm's `scaled_dot_product_attention`, answered in place for paged decode."""
    routed = getattr(cache, "routed_attention", None)
    if routed is not None:
        out, keys, values = routed(queries, keys, values, scale, mask, sinks, bool(extra))
        if out is not None:
            return out
    return _ORIGINAL(
        queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks, **extra
    )


def model_modules(model) -> list[str]:
    """The names of the Python modules defining the model's layers that import mlx-lm's helper."""
    names = {type(module).__module__ for _, module in model.named_modules()}
    names.add(type(model).__module__)
    return sorted(
        name
        for name in names
        if getattr(sys.modules.get(name), "scaled_dot_product_attention", None)
        in (_ORIGINAL, paged_sdpa)
    )


def route(model) -> list[str]:
    """Routes the model's attention helper to `paged_sdpa`; returns the modules it touched."""
    names = model_modules(model)
    with _LOCK:
        for name in names:
            _USERS[name] = _USERS.get(name, 0) + 1
            sys.modules[name].scaled_dot_product_attention = paged_sdpa
    return names


def unroute(names: list[str]) -> None:
    """Undoes one `route`: a module gets mlx-lm's helper back when no routed model uses it."""
    with _LOCK:
        for name in names:
            _USERS[name] -= 1
            if _USERS[name] == 0:
                del _USERS[name]
                sys.modules[name].scaled_dot_product_attention = _ORIGINAL
