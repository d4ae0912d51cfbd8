"""Fused paged decode attention kernels for MLX: CUDA (`paged_decode.cu`) and Metal
(`paged_decode.metal`), one algorithm (`pagedkv.spec.split_k`) in two languages, plus a
tensor-core pass 1 for 16-bit pools on NVIDIA GPUs from sm_80 (`paged_decode_mma.cu`).

- `source`: the kernel files, cut into sections.
- `decode`: shape choices, kernel objects built once per variant, the launch (`paged_decode`).
- `dispatch`: which path runs (`PAGEDKV_ATTENTION=auto|kernel|gather`) and the Metal self-check.
- `write`: the mlx-lm adapter's decode rows written into the pools' buffers on CUDA
  (`write_rows.cu`, `PAGEDKV_DECODE_WRITES=auto|functional`).
"""

from pagedkv.mlx_backend.kernels.decode import DecodeBatch, paged_decode

__all__ = ["DecodeBatch", "paged_decode"]
