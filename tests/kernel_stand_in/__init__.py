"""Stand-ins for `mx.fast.metal_kernel` and `mx.fast.cuda_kernel` that run a kernel's source on
the CPU.

No Apple GPU is available to this project's CI, and no NVIDIA GPU either, so the kernels would
otherwise only be compiled or read there. These let the real launch code
(`pagedkv.mlx_backend.kernels.decode`) run them: `metal_kernel` and `cuda_kernel` have MLX's
signatures, and each call writes the kernel text as MLX assembles it, compiles that text in
C++20 against a small model of the language (`metal.h` or `cuda.h` over `launch.h`) and runs the
grid with one std::thread per kernel thread, threadgroups one after another.

- Metal (`write_signature` in mlx/backend/common/metal_kernel.cpp): the header, a template line,
  inputs `const device T*` or, under 8 elements, `const constant T*`, their `_shape`,
  `_strides` and `_ndim` where the source names them, outputs `device T*`, then each Metal
  attribute whose name occurs in the source.
- CUDA (`build_kernel` in mlx/backend/cuda/custom_kernel.cpp): the header, then in namespace
  `mlx::core::cu` a `__global__ void` with inputs `const T*` (and `const __grid_constant__ Shape
  name_shape` etc.), outputs `T*`, template arguments as constants at the top of the body. The
  header's functions that hold inline PTX are replaced by the stand-in's emulation of the same
  instruction (`EMULATED`): the tensor-core pass 1's mma.sync and movmatrix.

What this shows: the kernels' logic (indexing, masking, the online softmax, the merges, the
barriers, shuffles and fragment layouts they rely on) computes what the spec does. What it
cannot show: that Apple's compiler or NVRTC accepts the text (tests/unit/test_kernel_compiles.py
does that for CUDA where nvcc is installed), address spaces, the memory model across concurrent
threadblocks, or speed. Binaries are cached by their source under the temp directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).parent
SMALL_INPUT = 8  # Metal: MLX passes inputs with fewer elements in the constant address space
TYPES = {
    "metal": {
        mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t",
        mx.int32: "int32_t", mx.uint32: "uint32_t",
    },
    "cuda": {
        mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
        mx.int32: "int32_t", mx.uint32: "uint32_t",
    },
}  # fmt: skip
BITS = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}  # moved as bits
NUMPY = {mx.uint32: np.uint32, mx.uint16: np.uint16, mx.int32: np.int32}
NAN_BITS = {mx.float32: 0x7FC00000, mx.float16: 0x7E00, mx.bfloat16: 0x7FC0}
# MLX's Metal attributes, in its order, from the launch's thread-local state (launch.h).
METAL_ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": ("uint", "PKV_THREADS / 4"),
    "dispatch_simdgroups_per_threadgroup": ("uint", "PKV_THREADS / 32"),
    "dispatch_threads_per_threadgroup": ("uint3", "pkv_size"),
    "grid_origin": ("uint3", "uint3{0, 0, 0}"),
    "grid_size": ("uint3", "PKV_GRID"),
    "quadgroup_index_in_threadgroup": ("uint", "pkv_tid / 4"),
    "quadgroups_per_threadgroup": ("uint", "PKV_THREADS / 4"),
    "simdgroup_index_in_threadgroup": ("uint", "pkv_tid / 32"),
    "simdgroups_per_threadgroup": ("uint", "PKV_THREADS / 32"),
    "thread_execution_width": ("uint", "32u"),
    "thread_index_in_quadgroup": ("uint", "pkv_tid % 4"),
    "thread_index_in_simdgroup": ("uint", "pkv_tid % 32"),
    "thread_index_in_threadgroup": ("uint", "pkv_tid"),
    "thread_position_in_grid": ("uint3", "uint3{PKV_AT(x), PKV_AT(y), PKV_AT(z)}"),
    "thread_position_in_threadgroup": ("uint3", "pkv_thread"),
    "threadgroup_position_in_grid": ("uint3", "pkv_group"),
    "threadgroups_per_grid": ("uint3", "pkv_groups"),
    "threads_per_grid": ("uint3", "PKV_GRID"),
    "threads_per_simdgroup": ("uint", "32u"),
    "threads_per_threadgroup": ("uint3", "pkv_size"),
}  # fmt: skip
METAL_MACROS = (  # for the attributes' values in main, after the kernel
    "#define PKV_THREADS (pkv_size.x * pkv_size.y * pkv_size.z)\n"
    "#define PKV_AT(c) (pkv_group.c * pkv_size.c + pkv_thread.c)\n"
    "#define PKV_GRID uint3{pkv_groups.x * pkv_size.x, pkv_groups.y * pkv_size.y, "
    "pkv_groups.z * pkv_size.z}\n"
)
# Inline PTX in a CUDA header, by function name: the stand-in's definition instead (cuda.h).
EMULATED = {
    "pkv_mma": "template <int KIND>\nvoid pkv_mma(float* c, unsigned int a0, unsigned int a1, "
    "unsigned int a2, unsigned int a3, unsigned int b0, unsigned int b1) "
    "{ pkv_mma_emulated<KIND>(c, a0, a1, a2, a3, b0, b1); }\n",
    "pkv_transpose": "inline unsigned int pkv_transpose(unsigned int x) "
    "{ return pkv_movmatrix_trans(x); }\n",
}
FLAGS = ["-std=c++20", "-O1", "-pthread", "-fno-strict-aliasing", "-w"]
RUN_SECONDS = 120  # lanes that stop exchanging together deadlock: fail, don't hang


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


@cache
def unavailable(language: str) -> str | None:
    """None if a C++20 compiler here builds the `language` model ("metal" or "cuda": std::barrier,
    _Float16), else why not."""
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler (g++ or clang++, or $CXX) to build the kernel stand-ins"
    with tempfile.TemporaryDirectory() as work:
        probe = Path(work, f"{language}.cpp")
        probe.write_text(f'#include "{HERE / language}.h"\nint main() {{ return 0; }}\n')
        built = subprocess.run(
            [cxx, *FLAGS, "-o", str(Path(work, language)), str(probe)],
            capture_output=True, text=True,
        )  # fmt: skip
    if built.returncode:
        return (
            f"{cxx} cannot build the {language} stand-in (C++20, _Float16): {built.stderr[-300:]}"
        )
    return None


def metal_kernel(
    name, input_names, output_names, source, header="", ensure_row_contiguous=True,
    atomic_outputs=False,
):  # fmt: skip
    """`mx.fast.metal_kernel`'s signature; the kernel runs on the CPU (module docstring)."""
    if atomic_outputs:
        raise NotImplementedError("the Metal stand-in has no atomic outputs")
    return Kernel("metal", name, input_names, output_names, source, header)


def cuda_kernel(
    name, input_names, output_names, source, header="", ensure_row_contiguous=True,
    shared_memory=0,
):  # fmt: skip
    """`mx.fast.cuda_kernel`'s signature; the kernel runs on the CPU (module docstring)."""
    return Kernel("cuda", name, input_names, output_names, source, header)


class Kernel:
    def __init__(self, language, name, input_names, output_names, source, header):
        self.language, self.name, self.source = language, name, source
        self.header = header if language == "metal" else emulate_ptx(header)
        self.input_names, self.output_names = list(input_names), list(output_names)

    def __call__(
        self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
        init_value=None, verbose=False, stream=None,
    ) -> list[mx.array]:  # fmt: skip
        if any(g % t for g, t in zip(grid, threadgroup)):
            raise ValueError(f"the stand-in runs whole threadgroups: grid {grid}, {threadgroup}")
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        binary = self.build(inputs, output_dtypes, template or [])
        with tempfile.TemporaryDirectory() as work:
            meta = [g // t for g, t in zip(grid, threadgroup)] + list(threadgroup)
            for i, x in enumerate(inputs):
                data = np.ascontiguousarray(_numpy(x))  # ensure_row_contiguous: MLX copies
                data.tofile(Path(work, f"in{i}"))
                strides = [s // data.itemsize for s in data.strides]
                meta += [data.size, data.ndim, *data.shape, *strides]
            for i, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes)):
                count = int(np.prod(shape))
                _initial(dtype, count, init_value).tofile(Path(work, f"out{i}"))
                meta.append(count)
            Path(work, "meta").write_text(" ".join(str(int(v)) for v in meta))
            ran = subprocess.run(
                [binary, work], capture_output=True, text=True, timeout=RUN_SECONDS
            )
            if ran.returncode:
                raise RuntimeError(f"stand-in kernel {self.name} failed: {ran.stderr[-500:]}")
            return [
                _from_numpy(np.fromfile(Path(work, f"out{i}"), _numpy_type(dtype)), dtype, shape)
                for i, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes))
            ]

    def program(self, inputs, output_dtypes, template) -> str:
        """The kernel as MLX writes it (minus Metal's [[...]] attributes), then a main that reads
        the inputs and outputs, launches the grid and writes the outputs back."""
        types = TYPES[self.language]
        params, args, reads, writes = [], [], [], []
        for i, (name, x) in enumerate(zip(self.input_names, inputs)):
            params.append(self.input_param(name, x))
            scalar = x.ndim == 0 and self.language == "metal"  # Metal: a reference
            args.append(f"{'*' if scalar else ''}in{i}.data()")
            reads.append(
                f"size_t n{i} = next(); int nd{i} = next(); std::array<int32_t, 10> shape{i}{{}};"
                f" std::array<int64_t, 10> strides{i}{{}};"
                f" for (int k = 0; k < nd{i}; k++) shape{i}[k] = next();"
                f" for (int k = 0; k < nd{i}; k++) strides{i}[k] = next();"
                f' auto in{i} = pkv_read<{types[x.dtype]}>(dir + "/in{i}", n{i});'
            )
            for info, kind, arg in self.shape_infos(i):
                if x.ndim > 0 and name + info in self.source:
                    params.append(f"{kind} {name}{info}")
                    args.append(arg)
        for i, (name, dtype) in enumerate(zip(self.output_names, output_dtypes)):
            params.append(f"{'device ' if self.language == 'metal' else ''}{types[dtype]}* {name}")
            args.append(f"out{i}.data()")
            reads.append(
                f"size_t m{i} = next();"
                f' auto out{i} = pkv_read<{types[dtype]}>(dir + "/out{i}", m{i});'
            )
            writes.append(f'pkv_write(dir + "/out{i}", out{i});')
        if self.language == "metal":
            for attribute, (kind, value) in METAL_ATTRIBUTES.items():
                if attribute in self.source:  # as MLX finds them: in the body only
                    params.append(f"{kind} {attribute}")
                    args.append(value)
            kernel, call = self.metal_function(params, template)
        else:
            kernel, call = self.cuda_function(params, template)
        return (
            f'#include "{HERE / self.language}.h"\n{self.header}\n{kernel}\n'
            + (METAL_MACROS if self.language == "metal" else "")
            + "int main(int argc, char** argv) {\n"
            + "  const std::string dir = argv[1];\n"
            + '  FILE* meta = std::fopen((dir + "/meta").c_str(), "r");\n'
            + '  auto next = [&] { long long v = 0; if (std::fscanf(meta, "%lld", &v) != 1)'
            + " std::exit(3); return v; };\n"
            + "  const uint3 groups{uint(next()), uint(next()), uint(next())};\n"
            + "  const uint3 size{uint(next()), uint(next()), uint(next())};\n"
            + "".join(f"  {line}\n" for line in reads)
            + "  pkv_launch(groups, size, [&] {\n"
            + ("    pkv_cuda_thread();\n" if self.language == "cuda" else "")
            + f"    {call}({', '.join(args)});\n  }});\n"
            + "".join(f"  {line}\n" for line in writes)
            + "  return 0;\n}\n"
        )

    def input_param(self, name, x) -> str:
        ctype = TYPES[self.language][x.dtype]
        if self.language == "cuda":
            return f"const {ctype}* {name}"
        space = "constant" if x.size < SMALL_INPUT else "device"
        return f"const {space} {ctype}{'&' if x.ndim == 0 else '*'} {name}"

    def shape_infos(self, i: int):
        if self.language == "metal":
            return (
                ("_shape", "const constant int*", f"shape{i}.data()"),
                ("_strides", "const constant int64_t*", f"strides{i}.data()"),
                ("_ndim", "const constant int&", f"nd{i}"),
            )
        return (
            ("_shape", "const __grid_constant__ Shape", f"shape{i}"),
            ("_strides", "const __grid_constant__ Strides", f"strides{i}"),
            ("_ndim", "const __grid_constant__ int", f"nd{i}"),
        )

    def metal_function(self, params, template):
        declaration, call = "", self.name
        if template:
            kinds = ["typename" if isinstance(v, mx.Dtype) else "bool" if isinstance(v, bool)
                     else "int" for _, v in template]  # fmt: skip
            declaration = "template <" + ", ".join(
                f"{k} {n}" for k, (n, _) in zip(kinds, template)
            ) + ">\n"  # fmt: skip
            call += "<" + ", ".join(self.template_value(v) for _, v in template) + ">"
        body = f"{declaration}void {self.name}(\n  " + ",\n  ".join(params)
        return body + f") {{\n{self.source}\n}}\n", call

    def cuda_function(self, params, template):
        constants = ""
        for name, value in template:
            if isinstance(value, mx.Dtype):
                constants += f"  using {name} = {TYPES['cuda'][value]};\n"
            else:
                kind = "bool" if isinstance(value, bool) else "int"
                shown = str(value).lower() if isinstance(value, bool) else str(value)
                constants += f"  constexpr {kind} {name} = {shown};\n"
        text = (
            "namespace mlx::core::cu {\nusing Shape = std::array<int32_t, 10>;\n"
            "using Strides = std::array<int64_t, 10>;\n"
            f"__global__ void {self.name}(\n    " + ",\n    ".join(params)
            + f") {{\n{constants}\n{self.source}\n}}\n}}  // namespace mlx::core::cu\n"
        )  # fmt: skip
        return text, f"mlx::core::cu::{self.name}"

    def template_value(self, value) -> str:
        if isinstance(value, mx.Dtype):
            return TYPES[self.language][value]
        return str(int(value))  # MLX streams a bool as 1 or 0

    def build(self, inputs, output_dtypes, template) -> str:
        text = self.program(inputs, output_dtypes, template)
        cxx = compiler()
        models = "".join((HERE / f).read_text() for f in ("launch.h", "metal.h", "cuda.h"))
        key = hashlib.sha256("\0".join([text, models, cxx, *FLAGS]).encode())
        folder = Path(tempfile.gettempdir(), "pagedkv-kernel-stand-in", key.hexdigest()[:24])
        binary = folder / "kernel"
        if not binary.exists():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "kernel.cpp").write_text(text)
            built = subprocess.run(
                [cxx, *FLAGS, "-o", str(folder / "kernel.tmp"), str(folder / "kernel.cpp")],
                capture_output=True, text=True,
            )  # fmt: skip
            if built.returncode:
                raise RuntimeError(f"stand-in kernel {self.name} does not compile:\n{built.stderr}")
            os.replace(folder / "kernel.tmp", binary)  # whole binaries only, for a later run
        return str(binary)


def emulate_ptx(header: str) -> str:
    """The header with each top-level function that holds inline PTX (`asm(`) replaced by the
    stand-in's definition of the same name (EMULATED); one without an emulation is refused."""
    out, chunk, depth, opened = [], [], 0, False
    for line in header.splitlines(keepends=True):
        chunk.append(line)
        depth += line.count("{") - line.count("}")
        opened = opened or "{" in line
        ends = opened or line.lstrip().startswith("#") or line.rstrip().endswith(";")
        if depth == 0 and ends:
            text = "".join(chunk)
            if "asm(" in text:
                name = re.search(r"\b(\w+)\s*\(", text.split("asm(")[0].split(")")[0]).group(1)
                if name not in EMULATED:
                    raise NotImplementedError(f"no stand-in for the inline PTX in {name}")
                text = EMULATED[name]
            out.append(text)
            chunk, opened = [], False
    return "".join(out) + "".join(chunk)


def _numpy_type(dtype):
    return NUMPY[BITS.get(dtype, dtype)]


def _numpy(x: mx.array) -> np.ndarray:
    return np.array(x.view(BITS[x.dtype]) if x.dtype in BITS else x)


def _initial(dtype, count: int, init_value) -> np.ndarray:
    """An output's contents before the kernel runs: `init_value`, else NaN, which a kernel that
    leaves an element unwritten passes on to the result (MLX leaves outputs uninitialised)."""
    if init_value is None:
        return np.full(count, NAN_BITS[dtype], _numpy_type(dtype))
    return _numpy(mx.full((count,), init_value, dtype))


def _from_numpy(bits: np.ndarray, dtype, shape) -> mx.array:
    out = mx.array(bits)
    return (out.view(dtype) if dtype in BITS else out).reshape(shape)
