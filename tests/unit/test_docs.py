"""Every ```python block in docs/ and the README runs, in order, one namespace per page: the docs cannot drift."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in [*DOCS.rglob("*.md"), ROOT / "README.md"] if "```python" in p.read_text())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(page, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks, f"{page} has no python examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for number, code in enumerate(blocks, 1):
        if code.lstrip().startswith("# skip-test"):
            continue
        exec(compile(code, f"{page.name}[block {number}]", "exec"), namespace)  # noqa: S102
