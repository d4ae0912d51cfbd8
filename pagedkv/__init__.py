"""pagedkv: paged KV caching for MLX, with an executable NumPy spec.

`pagedkv.spec.PagedCache` is the readable reference; `pagedkv.mlx_backend.PagedCache` is the fast
implementation on MLX held to it exactly. Importing `pagedkv` never imports MLX.
"""

from pagedkv.config import Config
from pagedkv.types import IndexEntry, SequenceEntry, Snapshot, Stats

__version__ = "0.1.0"
__all__ = ["Config", "IndexEntry", "SequenceEntry", "Snapshot", "Stats", "__version__"]
