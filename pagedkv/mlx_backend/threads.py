"""Thread safety of the backend: one re-entrant lock per cache around every public method.

MLX records work lazily on the calling thread's stream, and a stream exists only in the thread
that made it ("There is no Stream(cpu, N) in current thread" when another thread evaluates the
graph). So a call that updates the K/V pools also schedules them (`mx.async_eval`) before it
returns: whatever thread comes next finds materialised (or in-flight) pools and builds on them.
"""

from __future__ import annotations

import threading
from functools import wraps


def serialised(cls):
    """Wraps each public method of `cls` in `self._lock`, created by the wrapped __init__."""
    public = [n for n in dir(cls) if not n.startswith("_")]  # its own and its mixins' (kv.py)
    for name in [n for n in public if callable(getattr(cls, n))]:
        setattr(cls, name, _holding_lock(getattr(cls, name)))
    original_init = cls.__init__

    @wraps(original_init)
    def init(self, *args, **kwargs):
        self._lock = threading.RLock()
        original_init(self, *args, **kwargs)

    cls.__init__ = init
    return cls


def _holding_lock(method):
    @wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper
