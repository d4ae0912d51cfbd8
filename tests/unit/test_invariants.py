"""Every invariant of `pagedkv.spec.rules`, broken on purpose on both sides.

Each case corrupts one piece of state directly (as a bug would) and asserts that
`check_invariants()` raises InvariantError citing that invariant's number and title. The backend's
own checks of its extra structures (B1..B5) are broken the same way. Also here: every number the
code, tests and docs cite names a rule, decision or invariant that exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pagedkv import Config
from pagedkv.errors import InvariantError
from pagedkv.spec import rules
from tests.impls import HAVE_MLX, IMPLS, cache_class

ROOT = Path(__file__).resolve().parents[2]


def build(impl: str, window: int | None = None):
    """Sequence a (blocks 0, 1, 2; 0 and 1 indexed), its fork b, and block 3 cached as a leaf."""
    cache = cache_class(impl)(Config(num_blocks=8, block_size=2, store_kv=False, window=window))
    a, _ = cache.add_sequence([1, 2, 3, 4, 5])
    cache.commit(a)
    b = cache.fork(a)
    c, _ = cache.add_sequence([7, 8, 9])
    cache.commit(c)
    cache.free(c)
    cache.check_invariants()
    return cache, a, b


def node(cache, block: int):
    """The index node of `block` (the two sides keep them in differently named maps)."""
    by_block = getattr(cache.index, "node_of_block", None) or cache.index.by_block
    return by_block[block]


def always_writable(cache) -> None:
    """Breaks the writability test itself (I10 guards it: with I4 nothing else can break I10)."""
    name = "_is_writable" if hasattr(cache, "_is_writable") else "_writable"
    setattr(cache, name, lambda block: True)


def set_attr(obj, name: str, value) -> None:
    setattr(obj, name, value)


# label -> (window, corruption(cache, a, b)); each breaks that invariant and none checked before it
BREAKS = {
    "I1": (None, lambda c, a, b: c.sequences[a].tokens.extend([6, 6])),
    "I2": (None, lambda c, a, b: c.sequences[a].table.__setitem__(1, -1)),
    "I3": (8, lambda c, a, b: c.sequences[a].table.__setitem__(0, -1)),
    "I4": (None, lambda c, a, b: c.pool.refcounts.__setitem__(2, c.pool.refcounts[2] + 1)),
    "I5": (None, lambda c, a, b: c.pool.free_queue.append(c.pool.free_queue[0])),
    "I6": (None, lambda c, a, b: c.pool.free_queue.popleft()),
    "I7": (None, lambda c, a, b: set_attr(node(c, 1), "key", node(c, 1).key[:1])),
    "I8": (None, lambda c, a, b: set_attr(node(c, 1), "key", (30, 40))),
    "I9": (None, lambda c, a, b: c.sequences[a].tokens.__setitem__(0, 99)),
    "I10": (None, lambda c, a, b: always_writable(c)),
    "I11": (None, lambda c, a, b: set_attr(c.sequences[a], "committed", 3)),
}
MORE_BREAKS = {  # further ways to break the same invariants
    "I7 two nodes, one block": ("I7", lambda c, a, b: set_attr(node(c, 3), "block", 1)),
    "I3 a hole without a window": ("I3", lambda c, a, b: c.sequences[a].table.__setitem__(0, -1)),
    "I9 the last token of an indexed block": (
        "I9",
        lambda c, a, b: c.sequences[a].tokens.__setitem__(3, 99),
    ),
    "I11 a handle not issued yet": ("I11", lambda c, a, b: set_attr(c, "next_sequence_id", 1)),
    "I11 a node used in the future": ("I11", lambda c, a, b: set_attr(c, "clock", 1)),
}


def expect(cache, label: str, title: str) -> None:
    with pytest.raises(InvariantError) as raised:
        cache.check_invariants()
    assert str(raised.value).startswith(f"{label} {title}: "), str(raised.value)


def test_every_invariant_has_a_case_that_breaks_it():
    assert list(BREAKS) == list(rules.invariants())
    assert list(rules.invariants()) == [f"I{n}" for n in range(1, len(BREAKS) + 1)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("label", list(BREAKS))
def test_check_invariants_cites_the_broken_invariant(impl, label):
    window, corrupt = BREAKS[label]
    cache, a, b = build(impl, window)
    corrupt(cache, a, b)
    expect(cache, label, rules.invariants()[label])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(MORE_BREAKS))
def test_check_invariants_cites_the_invariant_broken_another_way(impl, case):
    label, corrupt = MORE_BREAKS[case]
    cache, a, b = build(impl)
    corrupt(cache, a, b)
    expect(cache, label, rules.invariants()[label])


@pytest.mark.parametrize("impl", IMPLS)
def test_no_block_leaks_once_everything_is_freed_and_the_cache_cleared(impl):
    """I4 and I6 together: no sequences and an empty index leave all N blocks free."""
    cache, a, b = build(impl)
    cache.free(a)
    cache.free(b)
    cache.clear_cache()
    cache.check_invariants()
    assert sorted(cache.snapshot().free_queue) == list(range(8))


# ---- the backend's own structures ----------------------------------------------------------------


def _push_path(cache, a, b) -> None:
    seq = cache.sequences[a]
    seq.path.append(seq.path[-1])


BACKEND_BREAKS = {
    "B1": lambda c, a, b: set_attr(c.sequences[a], "holes", 1),
    "B2": lambda c, a, b: set_attr(node(c, 0), "children", 2),
    "B3": lambda c, a, b: set_attr(c.index, "num_blocked", c.index.num_blocked - 1),
    "B4": lambda c, a, b: c.index.evictable.clear(),
    "B5": _push_path,
}


@pytest.mark.skipif(not HAVE_MLX, reason="needs MLX (pagedkv[mlx])")
def test_backend_states_the_same_invariants():
    from pagedkv.mlx_backend.observe import INVARIANTS

    spec = rules.invariants()
    assert {k: v for k, v in INVARIANTS.items() if k.startswith("I")} == spec
    assert [k for k in INVARIANTS if k.startswith("B")] == list(BACKEND_BREAKS)


@pytest.mark.skipif(not HAVE_MLX, reason="needs MLX (pagedkv[mlx])")
@pytest.mark.parametrize("label", list(BACKEND_BREAKS))
def test_backend_check_invariants_cites_its_own_structures(label):
    from pagedkv.mlx_backend.observe import INVARIANTS

    cache, a, b = build("mlx")
    BACKEND_BREAKS[label](cache, a, b)
    expect(cache, label, INVARIANTS[label])


# ---- citations -----------------------------------------------------------------------------------


def cited_files() -> list[Path]:
    files = [*ROOT.glob("pagedkv/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("docs/*.md")]
    return [*files, ROOT / "README.md"]


LABELLED = ("pagedkv/spec/", "pagedkv/mlx_backend/", "docs/spec.md", "tests/unit/test_invariants")


def test_every_cited_rule_decision_and_invariant_exists():
    """ "rule 4", "rules 2, 3", "rule 5/6", "D3", "I6", "B2": each names an entry of the one list."""
    known_rules = set(rules.rules())
    labels = {*rules.decisions(), *rules.invariants(), *BACKEND_BREAKS}
    for path in cited_files():
        text, where = path.read_text(), str(path.relative_to(ROOT))
        for group in re.findall(r"\b[Rr]ules? (\d+(?:(?:, |/| and )\d+)*)", text):
            for number in re.findall(r"\d+", group):
                assert int(number) in known_rules, f"{where}: rule {number}"
        if where.startswith(LABELLED):
            for label in re.findall(r"\b([DIB]\d{1,2})\b", text):
                assert label in labels, f"{where}: {label}"


def test_the_rules_are_numbered_once_in_order():
    assert list(rules.rules()) == list(range(1, 11))
    assert list(rules.decisions()) == [f"D{n}" for n in range(1, len(rules.decisions()) + 1)]


def test_docs_spec_carries_the_rules_module_text():
    """docs/spec.md shows the rules, decisions and invariants exactly as `rules.py` states them."""
    page = (ROOT / "docs" / "spec.md").read_text()
    assert rules.regenerate(page) == page, "docs/spec.md is stale: run python -m pagedkv.spec"
