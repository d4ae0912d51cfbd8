"""What a wheel of pagedkv carries: files the package reads at run time that are not Python (the
kernel sources) must be listed as package data, or an installed (non-editable) pagedkv has no
kernel. Checked against pyproject.toml without building a wheel."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

ROOT = Path(__file__).resolve().parents[2]


def test_every_non_python_file_of_the_package_is_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"].get("package-data", {})
    data = [
        path
        for path in (ROOT / "pagedkv").rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    ]
    assert any(path.suffix == ".cu" for path in data)  # the check has something to check
    for path in data:
        package = ".".join(path.parent.relative_to(ROOT).parts)
        listed = patterns.get(package, [])
        assert any(fnmatch.fnmatch(path.name, p) for p in listed), (package, path.name)
