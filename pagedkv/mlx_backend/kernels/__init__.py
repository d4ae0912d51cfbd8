"""Fused paged decode attention kernels for MLX: CUDA (`paged_decode.cu`) and Metal
(`paged_decode.metal`), one algorithm (`pagedkv.spec.split_k`) in two languages.

- `source`: the kernel files, cut into sections.
- `decode`: shape choices, kernel objects built once per variant, the launch (`paged_decode`).
- `dispatch`: which path runs (`PAGEDKV_ATTENTION=auto|kernel|gather`) and the Metal self-check.
"""

from pagedkv.mlx_backend.kernels.decode import DecodeBatch, paged_decode

__all__ = ["DecodeBatch", "paged_decode"]
