"""The CUDA and Metal decode kernels are one kernel written twice (ADR 0002): the same sections,
the same names and the same loops, differing only in each language's vocabulary. Metal cannot run
here, so this is what keeps an edit to one file from silently leaving the other behind."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("mlx.core")

from pagedkv.mlx_backend.kernels import source  # noqa: E402

# CUDA spellings with a Metal counterpart (the translation paged_decode.metal's header states)...
TO_METAL = {
    "__shfl_xor_sync": "simd_shuffle_xor", "__shared__": "threadgroup",
    "__syncthreads": "threadgroup_barrier", "blockIdx": "threadgroup_position_in_grid",
    "gridDim": "threadgroups_per_grid", "threadIdx": "thread_position_in_threadgroup",
    "exp2f": "exp2", "fmaxf": "max",
}  # fmt: skip
# ...and words only one language needs: casts, qualifiers, pragmas, types, CUDA's shuffle mask.
CUDA_ONLY = {
    "__device__", "__forceinline__", "__half2float", "__int_as_float", "__uint_as_float",
    "__ushort_as_half", "make_uint4", "reinterpret_cast", "pragma", "unroll", "short", "unsigned",
    "size_t", "lanes", "__ldcg",
}  # fmt: skip
METAL_ONLY = {
    "INFINITY", "as_type", "half", "inline", "thread", "uint", "ushort", "device", "size_t",
    "mem_flags", "mem_threadgroup",
    "pkv_load16",  # the pool load, with a form for each address space MLX may pass an input in
}  # fmt: skip
# pkv_load16's definitions (a template line, then the function) are set aside: CUDA needs none
METAL_LOAD = re.compile(r"^template <typename T>\n.*pkv_load16\(const .*$\n?", re.MULTILINE)
IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")


def cuda_names(code: str) -> set[str]:
    return {TO_METAL.get(n, n) for n in IDENTIFIER.findall(code)} - CUDA_ONLY


def metal_names(code: str) -> set[str]:
    return set(IDENTIFIER.findall(code)) - METAL_ONLY


CUDA, METAL_AS_BUILT = source.sections("cuda"), source.sections("metal")
METAL = {name: METAL_LOAD.sub("", text) for name, text in METAL_AS_BUILT.items()}


def test_both_files_have_the_same_sections_in_order():
    assert list(CUDA) == list(METAL) == [
        "header", "partial", "merge", "final", "split", "reduce", "merge_splits",
    ]  # fmt: skip


@pytest.mark.parametrize("section", list(CUDA))
def test_a_section_uses_the_same_names_on_both_backends(section):
    cuda, metal = cuda_names(CUDA[section]), metal_names(METAL[section])
    assert cuda - metal == set(), f"{section}: only in paged_decode.cu"
    assert metal - cuda == set(), f"{section}: only in paged_decode.metal"


@pytest.mark.parametrize("section", list(CUDA))
def test_a_section_has_the_same_loops_and_branches_on_both_backends(section):
    for keyword in ("for (", "if (", "return", "continue", "break"):
        assert CUDA[section].count(keyword) == METAL[section].count(keyword), (section, keyword)


def test_only_the_metal_pool_load_is_set_aside():
    """Metal's two pkv_load16 definitions are all the comparisons leave out."""
    built, compared = METAL_AS_BUILT["header"], METAL["header"]
    assert built.count("\n") - compared.count("\n") == 4 and "pkv_load16" not in compared
    assert METAL["partial"] == METAL_AS_BUILT["partial"]  # its uses are still compared


def test_the_check_sees_a_name_added_to_one_side():
    """The comparison itself can fail: a variable only the CUDA body declares is reported."""
    edited = CUDA["partial"] + "int blk_next = 0;\n"
    assert cuda_names(edited) - metal_names(METAL["partial"]) == {"blk_next"}


MMA = source.sections("cuda_mma")


def test_the_tensor_core_pass_1_ends_where_the_shared_merge_begins():
    """paged_decode_mma.cu has its own header and partial and borrows paged_decode.cu's `merge`
    and `final` / `split` sections: every name those use that the CUDA partial declares, the mma
    partial declares too (e.g. the `sm_m` / `sm_l` / `sm_acc` arrays, `NSG`, `head0`, `b`)."""
    assert list(MMA) == ["header", "partial"]
    # what they may use without pass 1 declaring it: kernel arguments, template values, the
    # header's macros, C++ words and what the shared sections declare themselves
    given = {"sinks", "out", "o_acc", "o_ml", "HAS_SINKS", "TQ", "QT", "D", "static_cast"}
    given |= {"float", "size_t", "const", "int", "threadIdx", "fmaxf", "exp2f", "PKV_LOG2E"}
    given |= {"PKV_NEG_BIG"}
    mma_names = set(IDENTIFIER.findall(MMA["partial"]))
    for epilogue in ("final", "split"):
        shared = CUDA["merge"] + CUDA[epilogue]
        own = set(re.findall(r"\b(?:float|int|size_t)\s+(\w+)", shared)) | {"d", "head", "out_d"}
        needed = set(IDENTIFIER.findall(shared)) - given - own
        assert {"sm_m", "sm_l", "sm_acc", "NSG", "head0"} <= needed, epilogue  # the check sees them
        assert needed <= mma_names, (epilogue, needed - mma_names)
    for macro in ("PKV_LOG2E", "PKV_NEG_BIG", "PKV_NEG_INF"):  # the shared sections' constants
        assert f"#define {macro}" in MMA["header"]
    assert source.pass1_body("cuda_mma", split=True).endswith(CUDA["merge"] + CUDA["split"])
    assert source.pass1_body("cuda_mma", split=False).endswith(CUDA["merge"] + CUDA["final"])


ONCE = source.sections("once")


def test_the_single_launch_merge_reads_what_both_cuda_passes_1_declare():
    """paged_decode_once.cu's `arrive` runs after either CUDA pass 1's `split` epilogue, then
    `merge_splits` for the tile's QT rows at once (MR = QT; the merge kernel's MR is 1): the
    names it takes from pass 1 are declared by both, and the joined body closes every brace it
    opens."""
    assert list(ONCE) == ["arrive", "close"]
    taken = {"b", "head0", "HQ", "num_splits"}
    assert taken <= set(IDENTIFIER.findall(ONCE["arrive"] + CUDA["merge_splits"]))
    for backend in ("cuda", "cuda_mma"):
        assert taken <= set(IDENTIFIER.findall(source.sections(backend)["partial"])), backend
        body = source.once_body(backend)
        assert body.count("{") == body.count("}"), backend
        assert body.startswith(source.pass1_body(backend, split=True)), backend
        assert "#define PKV_PARTIAL" in source.sections(backend)["header"], backend
    assert "constexpr int MR = QT;" in ONCE["arrive"]
    for merge_kernel in (CUDA["reduce"], METAL["reduce"]):
        assert "constexpr int MR = 1;" in merge_kernel


def test_both_merge_kernels_are_the_setup_and_the_shared_merge():
    for backend in ("cuda", "metal"):
        parts = source.sections(backend)
        assert source.reduce_body(backend) == parts["reduce"] + parts["merge_splits"]
        assert "num_splits = o_ml_shape[1]" in parts["reduce"]
        body = source.reduce_body(backend)
        assert body.count("{") == body.count("}"), backend


def test_only_the_single_launch_reads_partials_through_l2():
    """The two-launch merge reads its partials with plain loads, as it did when the GPU suites
    verified it; the single launch, whose partials other threadblocks wrote during the same
    launch, redefines PKV_PARTIAL to an L2 load after its blocks have arrived."""
    for backend in ("cuda", "cuda_mma", "metal"):
        assert "#define PKV_PARTIAL(x) (x)" in source.sections(backend)["header"], backend
    assert "__ldcg" not in source.reduce_body("cuda")
    arrive = ONCE["arrive"]
    assert arrive.index("#define PKV_PARTIAL(x) __ldcg(&(x))") > arrive.index(
        "if (!pkv_last) return;"
    )
