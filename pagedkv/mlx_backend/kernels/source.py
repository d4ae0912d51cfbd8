"""Kernel sources: `paged_decode.cu` and `paged_decode.metal`, cut into their `//// name` sections.

The two files hold the same kernel in the same order, so they can be read side by side; this module
only splits them and joins the pass-1 body with its epilogue (`final` or `split`).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

_HERE = Path(__file__).parent
FILES = {"cuda": _HERE / "paged_decode.cu", "metal": _HERE / "paged_decode.metal"}


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
    return {name: "\n".join(lines) + "\n" for name, lines in parts.items()}


def pass1_body(backend: str, split: bool) -> str:
    """Pass 1: the blocked online softmax, then the normalised output (one split) or partials."""
    parts = sections(backend)
    return parts["partial"] + parts["split" if split else "final"]
