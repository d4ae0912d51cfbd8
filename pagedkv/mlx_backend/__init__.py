"""The MLX implementation of pagedkv: K/V pools as `mx.array` on the default device (Metal on Apple
silicon, CUDA with MLX's CUDA build, CPU otherwise) and metadata written for speed.

It shares no logic with `pagedkv.spec`; the differential state machine in `tests/property` holds
the two to identical results, snapshots and stored bytes.
"""

from pagedkv.config import Config
from pagedkv.mlx_backend.cache import PagedCache

__all__ = ["Config", "PagedCache"]
