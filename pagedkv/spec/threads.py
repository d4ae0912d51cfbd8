"""Threads: every public operation of a cache holds the cache's lock (decision D7).

Calls from several threads therefore run one at a time, each complete before the next starts, so
the rules and the all-or-nothing guarantee hold exactly as for one thread. The cost is one
uncontended lock acquisition per call (well under a microsecond); there is no parallelism inside
one cache. (The MLX backend has its own lock and also hands MLX work between threads; see
`pagedkv.mlx_backend.cache`.)
"""

from __future__ import annotations

import functools
import threading


def serialised(cls: type) -> type:
    """Class decorator: wraps each public method in `self._lock` (a re-entrant lock, so a method
    may call another)."""
    for name in dir(cls):  # the class's own methods and those of its mixins (spec/kv.py)
        method = getattr(cls, name)
        if callable(method) and not name.startswith("_") and not isinstance(method, type):
            setattr(cls, name, _holding_lock(method))
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        self._lock = threading.RLock()
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def _holding_lock(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return call
