"""Every architecture in mlx-lm's models folder: matches mlx-lm's own caches or is refused up front.

Each is built tiny from its own ModelArgs (tests/parity/zoo.py) and walked through a fresh
request decoding past its window, a prefix-hit request, a trim and re-feed, and a ragged batch
(tests/parity/walk.py): float32 logits within 1e-4 and greedy tokens identical at every step, or
`PagedKVStore.for_model` raises UnsupportedModelError before any forward pass. A new module in
mlx-lm is walked automatically; one that neither matches nor is refused fails here.

Each architecture is walked twice: on the CPU's path (gather -> SDPA), and on the path a CUDA
device takes, with the fused kernel run on the CPU by its C++ stand-in (tests/kernel_stand_in).
"""

import mlx.core as mx
import pytest

from pagedkv.mlx_backend.kernels import decode, dispatch
from tests import kernel_stand_in
from tests.kernel_stand_in import checks
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


@pytest.mark.skipif(
    kernel_stand_in.unavailable("cuda") is not None, reason=str(kernel_stand_in.unavailable("cuda"))
)
@pytest.mark.parametrize("arch", architectures())
def test_architecture_through_the_cuda_kernel_matches_mlx_lm(arch, monkeypatch):
    """The same walk with decode attention on the CUDA kernel's path (`auto` on a CUDA device:
    the kernel for every shape it covers), the kernel run on the CPU by its C++ stand-in
    (tests/kernel_stand_in). float32: the one-lane-per-chunk pass 1, split and one pass. Every
    routed architecture must get the kernel and still match mlx-lm within 1e-4. The GPU suite
    does the same on the device (docs/benchmarks.md, "Tests on the GPU")."""
    if arch in UNBUILDABLE:
        pytest.skip(UNBUILDABLE[arch])
    monkeypatch.setenv(dispatch.ENV, "auto")
    monkeypatch.setenv("PAGEDKV_DECODE_WRITES", "functional")  # the write kernel works in place
    monkeypatch.setattr(mx.fast, "cuda_kernel", kernel_stand_in.cuda_kernel)
    monkeypatch.setattr(decode, "POOL_VIEWS", False)  # the stand-in reads whole arrays
    monkeypatch.setattr(decode, "backend", lambda: "cuda")
    monkeypatch.setattr(dispatch, "DISPATCHER", dispatch.Dispatcher())
    launches = []
    real_call = kernel_stand_in.Kernel.__call__
    monkeypatch.setattr(
        kernel_stand_in.Kernel, "__call__",
        lambda self, **kw: launches.append(self.name) or real_call(self, **kw),
    )  # fmt: skip
    checks.clear_kernel_caches()
    seen: dict = {}
    try:
        status = walk(build(arch), seen)
    finally:
        checks.clear_kernel_caches()
    if arch in REFUSED:
        assert status.startswith("refused") and REFUSED[arch] in status, status
        return
    assert status.startswith("runs"), status
    pass_1 = [name for name in launches if "_reduce_" not in name]
    assert bool(pass_1) == bool(seen["routed_calls"]), (len(pass_1), seen)
    assert len(pass_1) <= seen["routed_calls"]
