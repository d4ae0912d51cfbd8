"""Kernel sources: `paged_decode.cu` and `paged_decode.metal`, cut into their `//// name` sections,
`paged_decode_mma.cu`, the tensor-core pass 1 for CUDA ("cuda_mma": its own header and
partial; the in-block merge, epilogues and merge kernel of `paged_decode.cu`), and
`paged_decode_once.cu`, the CUDA epilogue that merges the splits in pass 1's own launch.

The first two files hold the same kernel in the same order, so they can be read side by side; this
module only splits them, drops comments and indentation (MLX rebuilds and hashes the whole source string
at every kernel call: a shorter string is less host time per layer), and joins the pass-1 body
with its epilogue (`final` or `split`).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

_HERE = Path(__file__).parent
FILES = {
    "cuda": _HERE / "paged_decode.cu",
    "cuda_mma": _HERE / "paged_decode_mma.cu",
    "metal": _HERE / "paged_decode.metal",
    "once": _HERE / "paged_decode_once.cu",  # the single-launch merge (CUDA)
    "write": _HERE / "write_rows.cu",  # the in-place decode write (kernels/write.py)
}


@cache
def sections(backend: str) -> dict[str, str]:
    """{section name: text} of one backend's source file."""
    parts: dict[str, list[str]] = {}
    current = None
    for line in FILES[backend].read_text().splitlines():
        if line.startswith("//// "):
            current = line[5:].strip()
            parts[current] = []
        elif current is not None:
            parts[current].append(line)
    return {name: _compact(lines) for name, lines in parts.items()}


def _compact(lines: list[str]) -> str:
    """The code without `//` comments, indentation or blank lines (no string literal in the
    sources holds `//`; preprocessor lines keep their own line)."""
    code = [_COMMENT.sub("", line).strip() for line in lines]
    return "".join(line + "\n" for line in code if line)


_COMMENT = re.compile(r"//.*$")


def pass1_body(backend: str, split: bool) -> str:
    """Pass 1: the blocked online softmax, then the normalised output (one split) or partials."""
    shared = sections("cuda" if backend == "cuda_mma" else backend)
    return sections(backend)["partial"] + shared["merge"] + shared["split" if split else "final"]


def reduce_body(backend: str) -> str:
    """Pass 2: one threadblock per (sequence, query head) row merges that row's splits."""
    parts = sections(backend)
    return parts["reduce"] + parts["merge_splits"]


def once_body(backend: str) -> str:
    """Pass 1 with several splits and the merge in one CUDA launch: the split epilogue, then the
    last threadblock of a (sequence, kv head, query tile) merges its QT rows (MR = QT)."""
    once = sections("once")
    merge = sections("cuda")["merge_splits"]
    return pass1_body(backend, split=True) + once["arrive"] + merge + once["close"]
