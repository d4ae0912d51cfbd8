"""Every CUDA kernel body the launch code builds compiles, checked with nvcc where the CUDA toolkit
is installed (no GPU needed). The GPU suites compile them with NVRTC at first call; this catches a
source edit that NVRTC would reject (a redeclared name, a missing brace, an undeclared variable)
on a developer machine without a GPU. Skipped where nvcc is absent (CI's CPU runner).

The kernel text is assembled as MLX's `mx.fast.cuda_kernel` assembles it (`build_kernel` in
mlx/backend/cuda/custom_kernel.cpp): its header, our header section, then `__global__ void
name(const T* input, [const __grid_constant__ Shape input_shape,] ..., T* output, ...)` around
the body. MLX's own device header is replaced by a stand-in declaring what the bodies use of it.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

mx = pytest.importorskip("mlx.core")

from pagedkv.mlx_backend.kernels import decode, write  # noqa: E402

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(
    NVCC is None, reason="needs nvcc (the CUDA toolkit) to compile the CUDA kernels without a GPU"
)

STAND_IN = """#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/array>
#include <cstdint>
namespace mlx::core::cu { using Shape = cuda::std::array<int32_t, 10>; }
"""
C_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.int32: "int"}


class Recorder:
    """Stands in for mx.fast.cuda_kernel: keeps what a kernel object is built from, and on a
    call the input dtypes (MLX writes them into the signature), then returns zeros."""

    def __init__(self, built: list):
        self.built = built

    def __call__(self, **spec):
        def call(inputs, output_shapes, output_dtypes, **_):
            self.built.append((spec, [i.dtype for i in inputs], list(output_dtypes)))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

        return call


def kernel_text(spec: dict, input_dtypes: list, output_dtypes: list, index: int) -> str:
    body = spec["source"]
    params = []
    for name, dtype in zip(spec["input_names"], input_dtypes):
        params.append(f"const {C_TYPES[dtype]}* {name}")
        if f"{name}_shape" in body:
            params.append(f"const __grid_constant__ Shape {name}_shape")
    params += [f"{C_TYPES[d]}* {n}" for n, d in zip(spec["output_names"], output_dtypes)]
    signature = ",\n".join(params)
    return (
        f"namespace mlx::core::cu {{\n__global__ void k{index}_{spec['name']}(\n{signature}) {{\n"
        f"{body}\n}}\n}}\n"
    )


def compile_all(built: list, tmp_path, label: str) -> None:
    """One translation unit per header (the plain and the tensor-core pass 1 define the same
    macros), every kernel of that header in it."""
    by_header: dict[str, list[str]] = {}
    for index, (spec, ins, outs) in enumerate(built):
        by_header.setdefault(spec.get("header", ""), []).append(kernel_text(spec, ins, outs, index))
    for n, (header, kernels) in enumerate(by_header.items()):
        path = tmp_path / f"{label}_{n}.cu"
        path.write_text(STAND_IN + header + "".join(kernels))
        done = subprocess.run(
            [NVCC, "-arch=sm_90", "-std=c++17", "--cubin", "-o", str(tmp_path / "out.cubin"), str(path)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, f"{path.name}:\n{done.stderr[-4000:]}"


SHAPES = [  # (query dtype, pool dtype, head_dim, group, sinks)
    (mx.float32, mx.float32, 128, 4, False),
    (mx.float16, mx.float16, 128, 8, True),  # tensor-core pass 1 on sm_80+
    (mx.bfloat16, mx.bfloat16, 64, 1, False),  # tensor-core pass 1
    (mx.bfloat16, mx.bfloat16, 256, 4, True),
    (mx.float16, mx.float16, 80, 4, False),
    (mx.float32, mx.float16, 96, 2, True),
    (mx.float16, mx.float16, 256, 8, False),  # the most shared memory: tensor cores, QT 8
]


@pytest.mark.parametrize("one_launch", [True, False])
def test_every_decode_kernel_variant_compiles(monkeypatch, tmp_path, one_launch):
    """final, split, reduce and the single launch, on both pass-1 sources, for a spread of
    dtypes, head dims, GQA groups and sinks."""
    built: list = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", Recorder(built))
    monkeypatch.setattr(decode, "cuda_arch", lambda: 90)
    monkeypatch.setattr(decode, "_PLANS", {})
    monkeypatch.setattr(decode, "ONE_LAUNCH", one_launch)
    decode._kernel.cache_clear()
    decode.Plan.of.cache_clear()
    try:
        for query_dtype, pool_dtype, head_dim, group, sinks in SHAPES:
            queries = mx.zeros((2, 2 * group, head_dim), query_dtype)
            pool = mx.zeros((8, 16, 2, head_dim), pool_dtype)
            batch = decode.DecodeBatch(mx.zeros((2, 4), mx.int32), mx.array([[0, 60], [3, 9]]), 60)
            sink_logits = mx.zeros((2 * group,), mx.float32) if sinks else None
            for splits in (1, 3):
                decode.paged_decode(queries, pool, pool, batch, 0.1, sink_logits, splits, "cuda")
    finally:
        decode._kernel.cache_clear()
        decode.Plan.of.cache_clear()
    names = {spec["name"].split("_q")[0] for spec, _, _ in built}
    assert names == (
        {"pagedkv_decode_final", "pagedkv_decode_final_mma", "pagedkv_decode_once",
         "pagedkv_decode_once_mma"}
        if one_launch
        else {"pagedkv_decode_final", "pagedkv_decode_final_mma", "pagedkv_decode_split",
              "pagedkv_decode_split_mma", "pagedkv_decode_reduce"}
    )  # fmt: skip
    compile_all(built, tmp_path, "once" if one_launch else "two")


def test_the_in_place_write_kernel_compiles(monkeypatch, tmp_path):
    built: list = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", Recorder(built))
    write._kernel.cache_clear()
    try:
        for dtype in (mx.float32, mx.float16, mx.bfloat16):
            pool, rows = mx.zeros((4, 16, 2, 128), dtype), mx.zeros((1, 2, 128), dtype)
            tables = mx.zeros((1, 4), mx.int32)
            write.write_rows(pool, pool, rows, rows, mx.zeros((1,), mx.int32), tables, tables)
    finally:
        write._kernel.cache_clear()
    assert len(built) == 3
    compile_all(built, tmp_path, "write")
