"""`passes_history_through` (pagedkv/mlx_lm/callers.py): which attention functions may get
placeholders instead of the fetched history.

Every rule of the proof has a function in tests/unit/caller_examples.py that only that rule
decides: each rejected example is otherwise the accepted shape, so it would be proven if its rule
were dropped.
"""

from __future__ import annotations

import importlib
import linecache

import pytest
from mlx_lm.models.base import scaled_dot_product_attention

from pagedkv.mlx_lm import callers
from pagedkv.mlx_lm.callers import passes_history_through
from tests.unit.caller_examples import ACCEPTED, REJECTED, llama_style, returns_keys


@pytest.mark.parametrize("function", ACCEPTED, ids=lambda f: f.__name__)
def test_functions_passing_the_history_straight_to_the_helper_are_proven(function):
    """The llama shape (the `else` of the fetch's own `if` may read the names), gpt_oss's
    positional cache, a list target, a function that never reads the result, and one with a
    loop that holds neither the fetch nor the call."""
    assert passes_history_through(function.__code__) is True


@pytest.mark.parametrize("function", REJECTED, ids=lambda f: f.__name__)
def test_functions_that_may_read_the_history_are_not_proven(function):
    """Each is the accepted shape with one rule broken: a read of the names after the fetch, a
    fetch that is not one plain pair, a helper call that is not the one plain call with the
    fetching cache, a shadowed helper, introspection, or the names changed some other way."""
    assert passes_history_through(function.__code__) is False


@pytest.mark.parametrize("function", REJECTED, ids=lambda f: f.__name__)
def test_each_rejection_is_decided_not_an_error_swallowed(function):
    """The proof itself says no (`passes_history_through` would also turn an exception into
    False, which would hide a rule that crashes instead of deciding)."""
    assert callers._prove(function.__code__) is False


# ---- the source must be the running code --------------------------------------------------------

LLAMA_SHAPE = """\
def {name}(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)
"""
READS_KEYS = """\
def {name}(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys * 2, values, cache=cache, scale=1.0, mask=None)
"""


def load(path, source: str, name: str):
    """The function `name` from `source`, compiled as the file `path` (written first)."""
    path.write_text(source)
    linecache.checkcache(str(path))
    namespace = {"scaled_dot_product_attention": scaled_dot_product_attention}
    exec(compile(source, str(path), "exec"), namespace)
    return namespace[name]


def test_a_function_without_retrievable_source_is_not_proven():
    """Source compiled from a string: inspect cannot find it, so nothing is proven (no error)."""
    namespace = {}
    exec(compile(LLAMA_SHAPE.format(name="from_a_string"), "<string>", "exec"), namespace)
    assert passes_history_through(namespace["from_a_string"].__code__) is False


def test_a_file_edited_after_its_code_was_compiled_is_not_trusted(tmp_path):
    """The running function reads the keys; its file now shows the accepted shape under the same
    name and line. The proof compares the file's bytecode with the running one and refuses."""
    path = tmp_path / "edited_attention.py"
    unchanged = load(tmp_path / "kept_attention.py", LLAMA_SHAPE.format(name="kept"), "kept")
    assert passes_history_through(unchanged.__code__) is True  # a file's source is read
    running = load(path, READS_KEYS.format(name="edited"), "edited")
    path.write_text(LLAMA_SHAPE.format(name="edited") + "\n# edited after import\n")
    linecache.checkcache(str(path))
    assert passes_history_through(running.__code__) is False


def attention_whose_code_is_replaced(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def test_code_replaced_at_run_time_is_not_trusted():
    """A code object whose helper name was swapped for a function that reads the keys still points
    at this file's accepted source; its bytecode differs, so it is not proven."""
    code = attention_whose_code_is_replaced.__code__
    assert passes_history_through(code) is True
    names = tuple("read_keys" if n == callers.HELPER else n for n in code.co_names)
    assert names != code.co_names
    assert passes_history_through(code.replace(co_names=names)) is False


# ---- one proof per code object ------------------------------------------------------------------


def test_the_result_is_cached_per_code_object(monkeypatch):
    """Each code object is proven once; later calls return the stored answer, accepted, rejected,
    or failed (no source) alike."""
    monkeypatch.setattr(callers, "_PROOFS", {})
    proven = []
    original = callers._prove

    def counted(code):
        proven.append(code)
        return original(code)

    monkeypatch.setattr(callers, "_prove", counted)
    namespace = {}
    exec(compile(LLAMA_SHAPE.format(name="sourceless"), "<string>", "exec"), namespace)
    codes = [llama_style.__code__, returns_keys.__code__, namespace["sourceless"].__code__]
    first = [passes_history_through(code) for code in codes]
    second = [passes_history_through(code) for code in codes]
    assert first == second == [True, False, False]
    assert proven == codes


# ---- mlx-lm's own attention functions -----------------------------------------------------------


@pytest.mark.parametrize(
    "module, path, proven",
    [
        ("llama", "Attention.__call__", True),
        ("qwen3", "Attention.__call__", True),
        ("gpt_oss", "AttentionBlock.__call__", True),
        ("gemma2", "Attention.__call__", False),  # computes attention itself from the keys
        ("baichuan_m1", "Attention.__call__", False),  # the cache is `cache[1]`
    ],
)
def test_mlx_lm_attention_functions(module, path, proven):
    """What the proof says of mlx-lm's installed models: the llama family and gpt_oss pass the
    history straight on; gemma2 reads it itself; baichuan_m1 fetches through a subscript."""
    target = importlib.import_module(f"mlx_lm.models.{module}")
    for part in path.split("."):
        target = getattr(target, part)
    assert passes_history_through(target.__code__) is proven


def test_a_routed_store_proves_its_models_attention_ahead_of_decode(monkeypatch):
    """for_model reads the attention functions' sources when it routes, not in the first decode
    step: llama's Attention.__call__ is proven by then."""
    from mlx_lm.models import llama

    from pagedkv.mlx_lm import PagedKVStore
    from pagedkv.models import TINY, random_model

    code = llama.Attention.__call__.__code__
    monkeypatch.setattr(callers, "_PROOFS", {})
    store = PagedKVStore.for_model(random_model(TINY), num_blocks=16, block_size=4)
    try:
        assert callers._PROOFS[id(code)] == (code, True)
    finally:
        store.close()
    model = random_model(TINY)
    unrouted = PagedKVStore.for_model(model, num_blocks=16, route_attention=False)
    monkeypatch.setattr(callers, "_PROOFS", {})
    unrouted.route(model)  # routing later proves then too
    assert id(code) in callers._PROOFS
    unrouted.close()
