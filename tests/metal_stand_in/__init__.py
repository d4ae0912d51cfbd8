"""A stand-in for `mx.fast.metal_kernel` that runs a Metal kernel's source on the CPU.

No Apple GPU is available to this project's CI, so `paged_decode.metal` would otherwise only be
read. This module lets the real launch code (`pagedkv.mlx_backend.kernels.decode`, backend
"metal") run it: `metal_kernel` has MLX's signature, and each call writes the kernel text as MLX
assembles it (`write_signature` in mlx/backend/common/metal_kernel.cpp: the header, a template
line, inputs `const device T*` or, under 8 elements, `const constant T*`, their `_shape`,
`_strides` and `_ndim` where the source names them, outputs `device T*`, then each Metal attribute
whose name occurs in the source), compiles that text in C++20 against `prelude.h` (Metal's
vocabulary: 16-bit floats, as_type, exp2, threadgroup memory and barriers, 32-lane simdgroup
shuffles), and runs the grid with one std::thread per kernel thread.

What this shows: the kernel's logic (indexing, masking, the online softmax, the merges, the
barriers and shuffles it relies on) computes what the spec does. What it cannot show: that
Apple's compiler accepts the text (address spaces are not modelled), or anything about speed.
Binaries are cached by their source under the temp directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np

PRELUDE = Path(__file__).with_name("prelude.h")
SMALL_INPUT = 8  # MLX passes inputs with fewer elements in the constant address space
TYPES = {
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t",
    mx.int32: "int32_t", mx.uint32: "uint32_t",
}  # fmt: skip
BITS = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}  # moved as bits
NUMPY = {mx.uint32: np.uint32, mx.uint16: np.uint16, mx.int32: np.int32}
NAN_BITS = {mx.float32: 0x7FC00000, mx.float16: 0x7E00, mx.bfloat16: 0x7FC0}
# MLX's Metal attributes, in its order, as the stand-in's launch computes them (see prelude.h:
# tpt thread in threadgroup, tpg threadgroup in grid, ntg threadgroups, tsz threadgroup size,
# t the thread's index in its threadgroup).
ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": ("uint", "(tsz.x * tsz.y * tsz.z) / 4"),
    "dispatch_simdgroups_per_threadgroup": ("uint", "(tsz.x * tsz.y * tsz.z) / 32"),
    "dispatch_threads_per_threadgroup": ("uint3", "tsz"),
    "grid_origin": ("uint3", "uint3{0, 0, 0}"),
    "grid_size": ("uint3", "uint3{ntg.x * tsz.x, ntg.y * tsz.y, ntg.z * tsz.z}"),
    "quadgroup_index_in_threadgroup": ("uint", "t / 4"),
    "quadgroups_per_threadgroup": ("uint", "(tsz.x * tsz.y * tsz.z) / 4"),
    "simdgroup_index_in_threadgroup": ("uint", "t / 32"),
    "simdgroups_per_threadgroup": ("uint", "(tsz.x * tsz.y * tsz.z) / 32"),
    "thread_execution_width": ("uint", "32u"),
    "thread_index_in_quadgroup": ("uint", "t % 4"),
    "thread_index_in_simdgroup": ("uint", "t % 32"),
    "thread_index_in_threadgroup": ("uint", "t"),
    "thread_position_in_grid": (
        "uint3", "uint3{tpg.x * tsz.x + tpt.x, tpg.y * tsz.y + tpt.y, tpg.z * tsz.z + tpt.z}"
    ),
    "thread_position_in_threadgroup": ("uint3", "tpt"),
    "threadgroup_position_in_grid": ("uint3", "tpg"),
    "threadgroups_per_grid": ("uint3", "ntg"),
    "threads_per_grid": ("uint3", "uint3{ntg.x * tsz.x, ntg.y * tsz.y, ntg.z * tsz.z}"),
    "threads_per_simdgroup": ("uint", "32u"),
    "threads_per_threadgroup": ("uint3", "tsz"),
}  # fmt: skip
FLAGS = ["-std=c++20", "-O1", "-pthread", "-fno-strict-aliasing", "-w"]
RUN_SECONDS = 120  # a kernel whose lanes stop shuffling together deadlocks: fail, don't hang


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


@cache
def unavailable() -> str | None:
    """None if a C++20 compiler here builds the prelude (std::barrier, _Float16), else why not."""
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler (g++ or clang++, or $CXX) to build the Metal stand-in"
    with tempfile.TemporaryDirectory() as work:
        probe = Path(work, "probe.cpp")
        probe.write_text(f'#include "{PRELUDE}"\nint main() {{ return int(float(half(1.5f))); }}\n')
        built = subprocess.run(
            [cxx, *FLAGS, "-o", str(Path(work, "probe")), str(probe)],
            capture_output=True, text=True,
        )  # fmt: skip
    if built.returncode:
        return f"{cxx} cannot build the Metal stand-in (C++20, _Float16): {built.stderr[-300:]}"
    return None


def metal_kernel(
    name: str,
    input_names: list[str],
    output_names: list[str],
    source: str,
    header: str = "",
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
):
    """`mx.fast.metal_kernel`'s signature; the kernel runs on the CPU (module docstring)."""
    if atomic_outputs:
        raise NotImplementedError("the Metal stand-in has no atomic outputs")
    return _Kernel(name, list(input_names), list(output_names), source, header)


class _Kernel:
    def __init__(self, name, input_names, output_names, source, header):
        self.name, self.source, self.header = name, source, header
        self.input_names, self.output_names = input_names, output_names
        self.attributes = [a for a in ATTRIBUTES if a in source]  # as MLX finds them

    def __call__(
        self,
        *,
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        template=None,
        init_value=None,
        verbose=False,
        stream=None,
    ) -> list[mx.array]:
        if any(g % t for g, t in zip(grid, threadgroup)):
            raise ValueError(f"the stand-in runs whole threadgroups: grid {grid}, {threadgroup}")
        inputs = [mx.array(x) if not isinstance(x, mx.array) else x for x in inputs]
        binary = self._build(inputs, output_dtypes, template or [])
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
        """The kernel as MLX writes it (minus [[kernel]] and [[buffer]] attributes), then a main
        that reads the inputs and outputs, launches the grid and writes the outputs back."""
        params, args, reads = [], [], []
        for i, (name, x) in enumerate(zip(self.input_names, inputs)):
            space = "constant" if x.size < SMALL_INPUT else "device"
            ref = "&" if x.ndim == 0 else "*"
            params.append(f"const {space} {TYPES[x.dtype]}{ref} {name}")
            args.append(f"{'*' if x.ndim == 0 else ''}in{i}.data()")
            reads.append(
                f"size_t n{i} = next(); int nd{i} = next(); std::vector<int> shape{i}(nd{i});"
                f" for (auto& v : shape{i}) v = next(); std::vector<int64_t> strides{i}(nd{i});"
                f" for (auto& v : strides{i}) v = next();"
                f' auto in{i} = pkv_read<{TYPES[x.dtype]}>((dir + "/in{i}").c_str(), n{i});'
            )
            for info, kind, arg in (
                ("_shape", "const constant int*", f"shape{i}.data()"),
                ("_strides", "const constant int64_t*", f"strides{i}.data()"),
                ("_ndim", "const constant int&", f"nd{i}"),
            ):
                if x.ndim > 0 and name + info in self.source:
                    params.append(f"{kind} {name}{info}")
                    args.append(arg)
        writes = []
        for i, (name, dtype) in enumerate(zip(self.output_names, output_dtypes)):
            params.append(f"device {TYPES[dtype]}* {name}")
            args.append(f"out{i}.data()")
            reads.append(
                f"size_t m{i} = next();"
                f' auto out{i} = pkv_read<{TYPES[dtype]}>((dir + "/out{i}").c_str(), m{i});'
            )
            writes.append(f'pkv_write((dir + "/out{i}").c_str(), out{i});')
        for attribute in self.attributes:
            kind, value = ATTRIBUTES[attribute]
            params.append(f"{kind} {attribute}")
            args.append(value)
        declaration, instance = "", self.name
        if template:
            kinds = [_template_kind(value) for _, value in template]
            declaration = (
                "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">\n"
            )
            instance += "<" + ", ".join(_template_value(v) for _, v in template) + ">"
        return (
            f'#include "{PRELUDE}"\n{self.header}\n{declaration}void {self.name}(\n  '
            + ",\n  ".join(params)
            + f") {{\n{self.source}\n}}\n\n"
            + "int main(int argc, char** argv) {\n"
            + "  const std::string dir = argv[1];\n"
            + '  FILE* meta = std::fopen((dir + "/meta").c_str(), "r");\n'
            + '  auto next = [&] { long long v = 0; if (std::fscanf(meta, "%lld", &v) != 1)'
            + " std::exit(3); return v; };\n"
            + "  const uint3 groups{uint(next()), uint(next()), uint(next())};\n"
            + "  const uint3 size{uint(next()), uint(next()), uint(next())};\n"
            + "".join(f"  {line}\n" for line in reads)
            + "  pkv_launch(groups, size, [&](uint3 tpt, uint3 tpg, uint3 ntg, uint3 tsz, uint t)"
            + f" {{\n    {instance}({', '.join(args)});\n  }});\n"
            + "".join(f"  {line}\n" for line in writes)
            + "  return 0;\n}\n"
        )

    def _build(self, inputs, output_dtypes, template) -> str:
        text = self.program(inputs, output_dtypes, template)
        cxx = compiler()
        key = hashlib.sha256("\0".join([text, PRELUDE.read_text(), cxx, *FLAGS]).encode())
        folder = Path(tempfile.gettempdir(), "pagedkv-metal-stand-in", key.hexdigest()[:24])
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


def _template_kind(value) -> str:
    if isinstance(value, mx.Dtype):
        return "typename"
    return "bool" if isinstance(value, bool) else "int"


def _template_value(value) -> str:
    if isinstance(value, mx.Dtype):
        return TYPES[value]
    return str(int(value))  # MLX streams a bool as 1 or 0


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
