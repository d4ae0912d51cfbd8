"""The CUDA kernels' logic, run on the CPU: the decode kernels through the real launch code.

`mx.fast.cuda_kernel` is replaced by `tests.kernel_stand_in`, which compiles the kernel text as
MLX assembles it against a C++ model of the CUDA the kernels use (threadblocks of 128 threads with
real barriers and warp shuffles; the tensor-core pass 1's mma.sync and movmatrix computed from
their PTX fragment layouts) and runs it. `decode.prepare(..., "cuda")` then launches as on an
NVIDIA GPU: the one-lane-per-chunk pass 1 (`paged_decode.cu`, as on GPUs before sm_80 and for
float32 or head_dim 80 / 256), the tensor-core pass 1 (`paged_decode_mma.cu`, sm_80 and later),
their epilogues, the merge kernel and the single-launch merge (`paged_decode_once.cu`). Outputs
are held to the spec's split-K reference and the gather oracle with the GPU suite's tolerances.

The GPU parity suite (tests/parity/test_kernel_parity.py, logs under docs/benchmarks/) is what
verifies the kernels on real hardware; this keeps an edit to a kernel honest where there is no
GPU: CI, and a developer waiting for device time. It says nothing about NVRTC accepting the text
(tests/unit/test_kernel_compiles.py, with nvcc) or about speed.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from pagedkv.mlx_backend.kernels import decode, source
from tests import kernel_stand_in
from tests.kernel_stand_in import checks
from tests.parity.test_kernel_parity import RAGGED

pytestmark = pytest.mark.skipif(
    kernel_stand_in.unavailable("cuda") is not None, reason=str(kernel_stand_in.unavailable("cuda"))
)
SIMT, TENSOR_CORES = 0, 90  # compute capability: before sm_80 (no mma), an H100


@pytest.fixture(autouse=True)
def cuda_on_the_cpu(monkeypatch):
    checks.clear_kernel_caches()
    monkeypatch.setattr(mx.fast, "cuda_kernel", kernel_stand_in.cuda_kernel)
    monkeypatch.setattr(decode, "ONE_LAUNCH", False)
    monkeypatch.setattr(
        decode, "POOL_VIEWS", False
    )  # the stand-in reads whole arrays (also on a GPU host)
    yield
    checks.clear_kernel_caches()


def check(monkeypatch, arch, *args, one_launch=False, **kwargs):
    monkeypatch.setattr(decode, "cuda_arch", lambda: arch)
    monkeypatch.setattr(decode, "ONE_LAUNCH", one_launch)
    checks.clear_kernel_caches()
    launch = checks.check("cuda", *args, **kwargs)
    assert launch.plan.shape.tensor_cores == (
        arch >= 80 and decode.tensor_core_shape(args[1], launch.plan.shape.pool_dtype,
                                                launch.plan.shape.query_dtype)
    )  # fmt: skip
    assert launch.one_launch == (one_launch and launch.splits > 1)
    return launch


@pytest.mark.parametrize("head_dim", [16, 80, 128, 256])
def test_one_lane_per_chunk_pass_1_at_head_dims(monkeypatch, head_dim):
    check(monkeypatch, SIMT, "float16", head_dim, 16, 4, RAGGED, splits=3)


def test_one_lane_per_chunk_pass_1_in_float32_and_one_pass(monkeypatch):
    assert check(monkeypatch, TENSOR_CORES, "float32", 64, 16, 4, RAGGED).splits == 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_tensor_core_pass_1(monkeypatch, dtype, head_dim):
    check(monkeypatch, TENSOR_CORES, dtype, head_dim, 16, 4, RAGGED, splits=3)


@pytest.mark.parametrize("block_size, group", [(8, 1), (32, 8), (128, 2)])
def test_tensor_core_pass_1_blocks_and_gqa(monkeypatch, block_size, group):
    check(monkeypatch, TENSOR_CORES, "float16", 64, block_size, group, RAGGED)


def test_tensor_core_pass_1_windows_and_sinks(monkeypatch):
    check(monkeypatch, TENSOR_CORES, "bfloat16", 64, 16, 4, [1, 10, 100, 300], window=48, splits=3)
    check(monkeypatch, TENSOR_CORES, "bfloat16", 64, 16, 8, RAGGED, sinks=True, kv_heads=1)


@pytest.mark.parametrize("arch", [SIMT, TENSOR_CORES])
@pytest.mark.parametrize("splits", [3, decode.MAX_SPLITS])
def test_the_single_launch_merge(monkeypatch, arch, splits):
    """The last threadblock of each group merges its splits (atomic arrival counter); MAX_SPLITS
    is more than the merge's 128 threads."""
    check(monkeypatch, arch, "float16", 64, 16, 4, [1, 45], splits=splits, one_launch=True)


def test_the_stand_in_catches_a_wrong_fragment(monkeypatch):
    """The comparison can fail: the tensor-core pass 1 with its two K rows' fragments swapped in
    the scores' mma (rows r and r + 8 exchanged) is caught."""
    sections = dict(source.sections("cuda_mma"))
    right = "pkv_mma<KIND>(s, k_a[j].x, k_b[j].x, k_a[j].y, k_b[j].y, qf[j].x, qf[j].y);"
    assert right in sections["partial"]
    swapped = "pkv_mma<KIND>(s, k_b[j].x, k_a[j].x, k_b[j].y, k_a[j].y, qf[j].x, qf[j].y);"
    sections["partial"] = sections["partial"].replace(right, swapped)
    real = source.sections
    monkeypatch.setattr(source, "sections", lambda b: sections if b == "cuda_mma" else real(b))
    with pytest.raises(AssertionError):
        check(monkeypatch, TENSOR_CORES, "float16", 64, 16, 4, [45, 100], splits=1)


def test_inline_ptx_without_an_emulation_is_refused():
    header = '__device__ void pkv_new(int x) {\nasm("trap;");\n}\n'
    with pytest.raises(NotImplementedError, match="pkv_new"):
        kernel_stand_in.emulate_ptx(header)
    kept = "#define A 1\n__device__ int f(int x,\nint y) {\nreturn x;\n}\n"
    assert kernel_stand_in.emulate_ptx(kept) == kept


def test_a_compiler_that_cannot_build_the_model_is_named_in_the_skip_reason(monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    kernel_stand_in.unavailable.cache_clear()
    try:
        assert kernel_stand_in.unavailable("cuda").startswith(
            "false cannot build the cuda stand-in"
        )
    finally:
        monkeypatch.delenv("CXX")
        kernel_stand_in.unavailable.cache_clear()
    assert kernel_stand_in.unavailable("cuda") is None  # this machine's compiler again


def test_pools_go_to_a_real_cuda_device_as_one_element_views(monkeypatch):
    """decode.POOL_VIEWS (off until verified on a GPU): on a CUDA device each pool then reaches
    the kernels as a one-element view of its buffer (MLX counts one element, not the pool,
    towards ending its graph); the view starts where the pool does, also for a pool that is
    itself a slice. The stand-in reads whole arrays: where the default device is the CPU the
    launch keeps the pools, and the stand-in tests turn the views off (the fixture), since they
    make the launch code believe it is on a CUDA device."""
    monkeypatch.setattr(decode, "POOL_VIEWS", True)
    pool = mx.arange(2 * 16 * 2 * 8, dtype=mx.float16).reshape(2, 16, 2, 8)
    view = decode.pool_view(pool[1:])
    assert view.shape == (1,) and view.item() == pool[1, 0, 0, 0].item()
    queries = mx.zeros((1, 2, 8), mx.float16)
    batch = decode.DecodeBatch(mx.zeros((1, 2), mx.int32), mx.array([[0, 20]]), 20)
    monkeypatch.setattr(decode, "backend", lambda: None)  # the default device is the CPU
    assert not decode.prepare(queries, pool, batch, 0.1, False, None, "cuda").pool_views
    monkeypatch.setattr(decode, "backend", lambda: "cuda")
    assert decode.prepare(queries, pool, batch, 0.1, False, None, "cuda").pool_views
    monkeypatch.setattr(decode, "POOL_VIEWS", False)
    assert not decode.prepare(queries, pool, batch, 0.1, False, None, "cuda").pool_views
    assert not decode.prepare(queries, pool, batch, 0.1, False, None, "metal").pool_views
