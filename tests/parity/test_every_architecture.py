"""Every architecture in mlx-lm's models folder: matches mlx-lm's own caches or is refused up front.

Each is built tiny from its own ModelArgs (tests/parity/zoo.py) and walked through a fresh
request decoding past its window, a prefix-hit request, a trim and re-feed, and a ragged batch
(tests/parity/walk.py): float32 logits within 1e-4 and greedy tokens identical at every step, or
`PagedKVStore.for_model` raises UnsupportedModelError before any forward pass. A new module in
mlx-lm is walked automatically; one that neither matches nor is refused fails here.
"""

import pytest

from tests.parity.walk import walk
from tests.parity.zoo import architectures, build

# Cannot be built or run here at all (not a pagedkv matter).
UNBUILDABLE = {
    "bitnet": "its kernel is Metal-only (mx.fast.metal_kernel)",
    "muse_spark": "its forward pass is Metal-only (mlx_lm.kernels: mx.fast.metal_kernel, no CPU path)",
    "olmo": "needs the ai2-olmo package",
    "phi3small": "mlx-lm's own forward pass segfaults on the MLX CPU backend (11-token prompt)",
    "prism_hadamard_qwen35": "needs a Hadamard pack file",
}

# Refused by PagedKVStore.for_model: what the error names.
REFUSED = {
    "baichuan_m1": "CacheList",
    "deepseek_v32": "CacheList",
    "deepseek_v41": "LayerCache",
    "falcon_h1": "CacheList",
    "glm_moe_dsa": "CacheList",
    "llama4": "ChunkedKVCache",
    "longcat_flash": "CacheList",
    "longcat_flash_ngram": "CacheList",
    "mamba": "no attention K/V",
    "mamba2": "no attention K/V",
    "minimax_m3_vl": "CacheList",
    "olmo_hybrid": "no attention K/V",
    "plamo3": "depends on how the prompt is chunked",
    "rwkv7": "no attention K/V",
}


@pytest.mark.parametrize("arch", architectures())
def test_architecture_matches_mlx_lm_or_is_refused(arch):
    if arch in UNBUILDABLE:
        pytest.skip(UNBUILDABLE[arch])
    status = walk(build(arch))
    if arch in REFUSED:
        assert status.startswith("refused") and REFUSED[arch] in status, status
    else:
        assert status.startswith("runs"), status
