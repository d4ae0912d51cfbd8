"""The same cause gives the same message on both sides: every error text is built once, in
`pagedkv.errors`, and both implementations raise through it. Each bad call of the bad-input table
(tests/unit/test_bad_input.py) and a few that need a sliding window, an empty sequence or a
metadata-only cache run on the spec and the backend; their messages must be equal, except a
KVDtypeError's, which names each side's own array type or dtype."""

from __future__ import annotations

import pytest

from pagedkv import Config
from pagedkv import errors as E
from tests.impls import HAVE_MLX, cache_class, kv
from tests.unit.test_bad_input import CASES, populated, queries

pytestmark = pytest.mark.skipif(not HAVE_MLX, reason="compares the spec with the MLX backend")


def message(call, *args) -> str:
    with pytest.raises(E.PagedKVError) as info:
        call(*args)
    return str(info.value)


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c][1] is not E.KVDtypeError))
def test_every_bad_input_has_the_same_message_on_both_sides(case):
    texts = []
    for impl in ("spec", "mlx"):
        cache, a, b = populated(impl)
        texts.append(message(CASES[case][0], cache, impl, a, b))
    assert texts[0] == texts[1]


def windowed(impl):
    """Block size 4, window 6, 11 tokens: block 0 was released (a hole)."""
    config = Config(num_blocks=8, block_size=4, num_kv_heads=1, head_dim=2, window=6)
    cache = cache_class(impl)(config)
    seq, _ = cache.add_sequence([1, 2, 3])
    for _ in range(8):
        cache.extend(seq, [7])
    empty, _ = cache.add_sequence([5])
    cache.trim(empty, 1)
    return cache, seq, empty


STATE_CASES = {
    "write into a released block": lambda c, i, s, e: c.write_kv(s, 0, 1, *[kv(i, 1, 1, 2, 0)] * 2),
    "trim uncovers a hole": lambda c, i, s, e: c.trim(s, 9),
    "prefill reaches a hole": lambda c, i, s, e: c.attention_prefill(s, 0, queries(i, 10, 1, 2)),
    "decode over an empty sequence": lambda c, i, s, e: c.attention_decode(
        0, [e], queries(i, 1, 1, 2)
    ),
    "unknown handle lists the live ones": lambda c, i, s, e: c.fork(42),
    "decode_step twice": lambda c, i, s, e: c.decode_step([s, s], [1]),
    "can_decode_step twice": lambda c, i, s, e: c.can_decode_step([s, s]),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_state_errors_have_the_same_message_on_both_sides(case):
    texts = []
    for impl in ("spec", "mlx"):
        cache, seq, empty = windowed(impl)
        texts.append(message(STATE_CASES[case], cache, impl, seq, empty))
    assert texts[0] == texts[1]


def test_storage_disabled_has_the_same_message_on_both_sides():
    texts = []
    for impl in ("spec", "mlx"):
        cache = cache_class(impl)(Config(num_blocks=4, block_size=4, store_kv=False))
        seq, _ = cache.add_sequence([1, 2])
        texts.append(message(cache.gather, seq, 0))
    assert texts[0] == texts[1]
