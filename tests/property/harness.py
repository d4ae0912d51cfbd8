"""The state machine shared by the spec-only and the differential runs.

The reference model (`prefix_kv`: K/V as a function of the token prefix) and the spec's adapter
live in `tests/property/model.py`. `CacheMachine` applies each operation to every implementation
under test, demands the same result or the same error type from all, and checks that a failed
operation changed nothing.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagedkv.config import DTYPES, Config, ceil_div
from pagedkv.errors import (
    InvalidArgumentError,
    InvalidPositionError,
    InvalidTokensError,
    KVShapeError,
    OutOfBlocksError,
    PagedKVError,
    UnknownSequenceError,
)
from pagedkv.spec.window import HOLE
from tests import hostile
from tests.property import events, oracle
from tests.property.model import SpecImpl, prefix_kv

STEMS = (
    (1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5),  # two system prompts, and a third that
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8, 7, 6, 5),  # shares the first five tokens of the first
    (1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0),
)
tokens_strategy = st.lists(st.integers(0, 3), min_size=1, max_size=7)
OOB = OutOfBlocksError

# Bad calls with one faulty argument, by name: (a live handle, an unknown one) -> (operation,
# arguments, the error every side must raise).
BAD_CALLS = {
    "add_sequence: no tokens": lambda seq, unknown: ("add_sequence", ([],), InvalidTokensError),
    "add_sequence: negative token": lambda seq, unknown: (
        "add_sequence", ([1, -1],), InvalidTokensError),
    "add_sequence: token 2**31": lambda seq, unknown: (
        "add_sequence", ([1, 2**31],), InvalidTokensError),
    "add_sequence: namespace not a str": lambda seq, unknown: (
        "add_sequence", ([1], 7), InvalidArgumentError),
    "extend: unknown handle": lambda seq, unknown: (
        "extend", (unknown, [1]), UnknownSequenceError),
    "commit: unknown handle": lambda seq, unknown: ("commit", (unknown,), UnknownSequenceError),
    "fork: unknown handle": lambda seq, unknown: ("fork", (unknown,), UnknownSequenceError),
    "free: unknown handle": lambda seq, unknown: ("free", (unknown,), UnknownSequenceError),
    "evict: negative count": lambda seq, unknown: ("evict", (-1,), InvalidArgumentError),
    "trim: negative count": lambda seq, unknown: ("trim", (seq, -1), InvalidArgumentError),
}  # fmt: skip


class CacheMachine(RuleBasedStateMachine):
    """Drives every implementation in `impls` with identical operations."""

    impls: tuple = (SpecImpl,)

    def __init__(self) -> None:
        super().__init__()
        self.caches: list = []
        self.model: dict[int, list[int]] = {}  # live sequence id -> its tokens
        self.history: list[tuple[list[int], str]] = []  # recent prompts, for reuse

    # ---- plumbing -----------------------------------------------------------------------------

    def apply(self, op: str, *args, native_args=None):
        """Runs cache.op(*args) on every implementation. Returns ("ok", result) or ("error", type).
        `native_args(impl)` supplies per-implementation arguments (K/V arrays) instead of args."""
        outcomes = []
        before_first = self.caches[0].snapshot()
        for impl, cache in zip(self.impls, self.caches):
            before = cache.snapshot()
            call_args = native_args(impl) if native_args else args
            try:
                outcomes.append(("ok", getattr(cache, op)(*call_args)))
            except PagedKVError as error:
                assert cache.snapshot() == before, (
                    f"{impl.name}.{op} raised {error!r} yet changed state"
                )
                outcomes.append(("error", type(error)))
        first = outcomes[0]
        for impl, outcome in zip(self.impls[1:], outcomes[1:]):
            assert outcome == first, (
                f"{op}{args}: {self.impls[0].name} {first} != {impl.name} {outcome}"
            )
        events.record(op, args, before_first, self.caches[0].snapshot(), first)
        return first

    def write_true_rows(self, seq: int, start: int, stop: int) -> tuple:
        """Writes the model's K/V for positions [start, stop) in every layer."""
        outcome = ("ok", None)
        tokens = tuple(self.model[seq])
        for layer in range(self.config.num_layers):
            keys, values = prefix_kv(tokens, layer, self.config)
            outcome = self.write(seq, layer, start, keys[start:stop], values[start:stop])
        return outcome

    def write(self, seq: int, layer: int, start: int, keys: np.ndarray, values: np.ndarray):
        dtype = self.config.dtype

        def native(impl):
            return (seq, layer, start, impl.to_native(keys, dtype), impl.to_native(values, dtype))

        return self.apply("write_kv", native_args=native)

    def pick(self, data) -> int:
        return data.draw(st.sampled_from(sorted(self.model)), label="sequence")

    # ---- setup --------------------------------------------------------------------------------

    @initialize(
        num_blocks=st.integers(3, 24),
        prompts=st.sampled_from([None, 2, 3, 4]),
        block_size=st.sampled_from([1, 2, 3, 4]),
        num_layers=st.integers(1, 2),
        num_kv_heads=st.sampled_from([1, 2]),
        head_dim=st.sampled_from([2, 4]),
        dtype=st.sampled_from(DTYPES),
        window=st.one_of(st.none(), st.none(), st.integers(1, 6)),
    )
    def setup(self, num_blocks, prompts, **sizes) -> None:
        """Mostly a tight pool, with room for only `prompts` stem-sized prompts, so that
        allocation runs dry and eviction, reuse and refusals happen often."""
        if prompts is not None:
            num_blocks = prompts * ceil_div(len(STEMS[0]), sizes["block_size"])
        self.config = Config(num_blocks=num_blocks, **sizes)
        self.caches = [impl.make(self.config) for impl in self.impls]

    # ---- reserve -> write -> commit -----------------------------------------------------------

    @rule(
        stem=st.integers(0, len(STEMS) - 1),
        cut=st.integers(0, 14),
        suffix=tokens_strategy,
        namespace=st.sampled_from(["", "", "", "tenant-b"]),
        form=st.integers(0, hostile.TOKEN_FORMS - 1),
        cap=st.one_of(st.none(), st.none(), st.integers(0, 16)),
    )
    def add_sequence(self, stem, cut, suffix, namespace, form=0, cap=None):
        self.admit(list(STEMS[stem][:cut]) + suffix, namespace, form, cap)

    @precondition(lambda self: self.history)
    @rule(
        data=st.data(),
        suffix=st.one_of(st.just([]), tokens_strategy),
        release=st.booleans(),
    )
    def follow_up(self, data, suffix, release):
        """An earlier prompt again (suffix empty) or a next turn (an earlier prompt plus more
        tokens): its cached blocks are matched again, and released again when `release`, which
        reorders them for eviction (rule 6). A next turn needs fresh blocks after its matches, so
        under pressure its own matched blocks must not count as reclaimable."""
        prompt, namespace = data.draw(st.sampled_from(self.history), label="earlier prompt")
        seq = self.admit(prompt + suffix, namespace, 0)
        if seq is not None:
            assert self.apply("commit", seq)[0] == "ok"
            if release:
                self.free_sequence(seq)

    def admit(self, prompt: list[int], namespace: str, form: int, cap=None) -> int | None:
        """add_sequence on every side (tokens in accepted form `form`, at most `cap` cached),
        checked against prefix_match, can_add_sequence and the allocation oracle; writes the
        model's K/V. Returns the new handle, or None if out of blocks."""
        before = self.caches[0].snapshot()
        tokens = hostile.token_form(prompt, form)
        status, match = self.apply("prefix_match", tokens, namespace)
        assert status == "ok"
        can = self.apply("can_add_sequence", tokens, namespace, cap)[1]
        status, result = self.apply("add_sequence", tokens, namespace, cap)
        assert can == (status == "ok") and (can or result is OOB), (
            "can_add_sequence disagrees with add_sequence"
        )
        if status == "ok":
            seq, cached = result
            size = self.config.block_size
            assert cached % size == 0 and cached < len(prompt), (cached, len(prompt))
            assert cached == (match if cap is None else min(match, cap // size * size))
            table = oracle.table_of(self.caches[0].snapshot(), seq)
            shared = set(table[: cached // size])
            fresh = oracle.expected_allocation(before, len(table) - len(shared), shared, size)
            assert list(table[cached // size :]) == fresh, "allocation order (rules 5, 6)"
            self.model[seq] = prompt
            self.history = (self.history + [(prompt, namespace)])[-12:]
            assert self.write_true_rows(seq, cached, len(prompt))[0] == "ok"
            return seq
        return None

    @rule(stem=st.integers(0, len(STEMS) - 1), cut=st.integers(4, 14), suffix=tokens_strategy)
    def serve_prompt(self, stem, cut, suffix):
        """The common path of a server: a prompt on a shared system prompt, prefilled, committed."""
        before = len(self.model)
        self.add_sequence(stem, cut, suffix, "")
        if len(self.model) > before:
            assert self.apply("commit", max(self.model))[0] == "ok"

    @precondition(lambda self: self.model)
    @rule(data=st.data(), tokens=tokens_strategy)
    def extend_and_commit(self, data, tokens):
        self.extend(data, tokens)
        self.commit(data)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), tokens=tokens_strategy)
    def extend(self, data, tokens):
        seq = self.pick(data)
        before = self.caches[0].snapshot()
        handle = data.draw(hostile.handle_forms(seq), label="handle form")
        can = self.apply("can_extend", handle, len(tokens))[1]
        status, result = self.apply("extend", handle, data.draw(hostile.token_forms(tokens)))
        assert can == (status == "ok") and (can or result is OOB), (
            "can_extend disagrees with extend"
        )
        if status == "ok":
            after = self.caches[0].snapshot()
            got, want = oracle.expected_extension(before, after, [seq], self.config.block_size)
            assert got == want, "allocation order (rules 5, 6)"
            start = len(self.model[seq])
            self.model[seq] = self.model[seq] + tokens
            assert self.write_true_rows(seq, start, len(self.model[seq]))[0] == "ok"

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data())
    def rewrite_batch(self, data):
        """write_kv_batch of each sequence's own last rows (true values): allowed or not, alike."""
        live = sorted(s for s, tokens in self.model.items() if tokens)
        batch = data.draw(
            st.lists(st.sampled_from(live), min_size=1, max_size=4, unique=True), label="batch"
        )
        rows = data.draw(st.integers(1, min(len(self.model[s]) for s in batch)), label="rows")
        layer = data.draw(st.integers(0, self.config.num_layers - 1), label="layer")
        starts = [len(self.model[s]) - rows for s in batch]
        keys, values = [], []
        for seq, start in zip(batch, starts):
            k, v = prefix_kv(tuple(self.model[seq]), layer, self.config)
            keys.append(k[start:])
            values.append(v[start:])
        dtype = self.config.dtype

        def native(impl):
            return (
                batch,
                layer,
                starts,
                impl.to_native(np.stack(keys), dtype),
                impl.to_native(np.stack(values), dtype),
            )

        self.apply("write_kv_batch", native_args=native)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def decode_step(self, data):
        """One token for each of a batch of distinct sequences, as one operation."""
        batch = data.draw(
            st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=5, unique=True),
            label="batch",
        )
        tokens = data.draw(
            st.lists(st.integers(0, 3), min_size=len(batch), max_size=len(batch)), label="tokens"
        )
        self.decode(batch, tokens, data.draw(hostile.token_forms(tokens)))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 3), min_size=2, max_size=2))
    def sample_in_parallel(self, data, tokens):
        """Parallel sampling: fork a sequence, then decode parent and child in one step. A shared
        partial tail is copied once, by the first of the two (rule 1)."""
        seq = self.pick(data)
        status, child = self.apply("fork", seq)
        assert status == "ok"
        self.model[child] = list(self.model[seq])
        batch = data.draw(st.permutations([seq, child]), label="order")
        self.decode(batch, tokens, tokens)

    def decode(self, batch: list[int], tokens: list[int], form: object) -> None:
        """decode_step(batch, form) on every side (form: the tokens in some accepted form),
        checked against the allocation oracle; writes the model's K/V for the new positions."""
        before = self.caches[0].snapshot()
        can = self.apply("can_decode_step", batch)
        status, result = self.apply("decode_step", batch, form)
        assert can == ("ok", status == "ok"), "can_decode_step predicts decode_step"
        assert status == "ok" or result in (OOB, InvalidArgumentError), result
        if status == "ok":
            after = self.caches[0].snapshot()
            got, want = oracle.expected_extension(before, after, batch, self.config.block_size)
            assert got == want, "allocation order (rules 5, 6)"
            for seq in batch:  # a tail is copied only if it is not exclusive at its turn
                old, new = oracle.table_of(before, seq), oracle.table_of(after, seq)
                if old and len(old) == len(new) and new[-1] not in (old[-1], HOLE):
                    assert oracle.tail_was_shared(before, after, seq, batch), "needless copy"
            for seq, token in zip(batch, tokens):
                self.model[seq] = self.model[seq] + [token]
                end = len(self.model[seq])
                assert self.write_true_rows(seq, end - 1, end)[0] == "ok"

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def commit(self, data):
        assert self.apply("commit", self.pick(data))[0] == "ok"

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def rewrite_rows(self, data):
        """Writes garbage into a range; if allowed, no other sequence may see it; then repairs."""
        seq = self.pick(data)
        length = len(self.model[seq])
        if not length:
            return
        start = data.draw(st.integers(0, length - 1), label="start")
        stop = data.draw(st.integers(start + 1, length), label="stop")
        shape = (stop - start, self.config.num_kv_heads, self.config.head_dim)
        garbage = np.full(shape, 0.25, np.float32)
        status, _ = self.write(seq, 0, start, garbage, -garbage)
        if status == "ok":
            self.check_gathers(skip=seq)
            assert self.write_true_rows(seq, start, stop)[0] == "ok"

    # ---- fork, trim, free, eviction -----------------------------------------------------------

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def fork(self, data):
        seq = self.pick(data)
        status, child = self.apply("fork", seq)
        assert status == "ok"
        self.model[child] = list(self.model[seq])

    @precondition(lambda self: self.model)
    @rule(data=st.data(), extra=st.integers(0, 2))
    def trim(self, data, extra):
        seq = self.pick(data)
        length = len(self.model[seq])
        count = data.draw(st.integers(0, length), label="count") + (extra if extra == 2 else 0)
        before = self.caches[0].snapshot()
        status, result = self.apply("trim", seq, count)
        holes, window = self.holes(before, seq), self.config.window
        uncovers = holes and length - count - window < holes * self.config.block_size
        if count > length or uncovers:  # rule 8; rule 10: never uncover a released block
            assert status == "error"
        else:
            assert status == "ok"
            old, new = oracle.table_of(before, seq), oracle.table_of(self.caches[0].snapshot(), seq)
            assert new == old[: len(new)], "trim keeps the new tail block as it is"
            oracle.check_release(before, self.caches[0].snapshot(), list(reversed(old[len(new) :])))
            self.model[seq] = self.model[seq][: length - count]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data):
        self.free_sequence(self.pick(data))

    def free_sequence(self, seq: int) -> None:
        before = self.caches[0].snapshot()
        assert self.apply("free", seq)[0] == "ok"
        del self.model[seq]
        released = [b for b in reversed(oracle.table_of(before, seq)) if b != HOLE]
        oracle.check_release(before, self.caches[0].snapshot(), released)

    @rule(count=st.integers(0, 8))
    def evict(self, count):
        before = self.caches[0].snapshot()
        status, evicted = self.apply("evict", count)
        assert evicted == oracle.lru_victims(before, count, set(), self.config.block_size)
        assert self.caches[0].snapshot().free_queue == before.free_queue + tuple(evicted)

    @rule()
    def clear_cache(self):
        assert self.apply("clear_cache")[0] == "ok"

    # ---- bad input: the right error, and nothing changed (apply checks the snapshot) ----------

    @rule(case=st.sampled_from(sorted(BAD_CALLS)))
    def bad_call(self, case):
        """One named bad call of BAD_CALLS: the same error class on every side."""
        live = sorted(self.model)
        seq = live[0] if live else 0
        op, args, expected = BAD_CALLS[case](seq, max(live, default=-1) + 1000)
        if not live and op == "trim":
            expected = UnknownSequenceError  # no live handle to trim: the handle is refused
        assert self.apply(op, *args) == ("error", expected)

    @precondition(lambda self: self.model)
    @rule(past_the_end=st.booleans())
    def bad_write(self, past_the_end):
        """write_kv of rows past the end of a sequence, or of a wrong head_dim."""
        seq, cfg = min(self.model), self.config
        if past_the_end:
            good = np.zeros((1, cfg.num_kv_heads, cfg.head_dim), np.float32)
            end = len(self.model[seq])
            assert self.write(seq, 0, end, good, good) == ("error", InvalidPositionError)
        else:
            bad = np.zeros((1, cfg.num_kv_heads, cfg.head_dim + 1), np.float32)
            assert self.write(seq, 0, 0, bad, bad) == ("error", KVShapeError)

    @rule(extra=st.integers(1, 3))
    def prompt_larger_than_the_pool(self, extra):
        """A prompt longer than the whole pool can never fit: it must fail and change nothing."""
        prompt = [0] * (self.config.num_blocks * self.config.block_size + extra)
        assert self.apply("add_sequence", prompt, "") == ("error", OutOfBlocksError)

    @rule(data=st.data())
    def hostile_input(self, data):
        """A call that breaks the input contract (tests/hostile.py): an error on every side, the
        same class, nothing changed (apply checks both)."""
        op, args = data.draw(hostile.calls(sorted(self.model), self.config.num_layers))

        def native(impl):
            return hostile.native(args, impl.to_native, impl.queries, self.config)

        assert self.apply(op, *args, native_args=native)[0] == "error", (op, args)

    # ---- checks after every step --------------------------------------------------------------

    def holes(self, snapshot, seq: int) -> int:
        """Leading table entries the sliding window released (rule 10)."""
        table = oracle.table_of(snapshot, seq)
        return next((i for i, b in enumerate(table) if b != HOLE), len(table))

    def check_gathers(self, skip: int | None = None) -> None:
        snapshot = self.caches[0].snapshot()
        for seq, tokens in self.model.items():
            if seq == skip:
                continue
            released = self.holes(snapshot, seq) * self.config.block_size
            for layer in range(self.config.num_layers):
                want_k, want_v = prefix_kv(tuple(tokens), layer, self.config)
                want_k[:released], want_v[:released] = 0, 0  # rule 10: released rows read 0
                first_bits = None
                for impl, cache in zip(self.impls, self.caches):
                    keys, values = cache.gather(seq, layer)
                    got_k = impl.to_float32(keys, self.config.dtype)
                    got_v = impl.to_float32(values, self.config.dtype)
                    np.testing.assert_array_equal(got_k, want_k, f"{impl.name} K seq {seq}")
                    np.testing.assert_array_equal(got_v, want_v, f"{impl.name} V seq {seq}")
                    bits = (impl.to_bits(keys).tobytes(), impl.to_bits(values).tobytes())
                    assert first_bits is None or bits == first_bits, f"{impl.name} bytes differ"
                    first_bits = bits

    @invariant()
    def caches_agree_with_the_model(self) -> None:
        if not self.caches:
            return
        snapshots = []
        for cache in self.caches:
            cache.check_invariants()
            snapshot = cache.snapshot()
            stats = snapshot.stats
            assert (
                stats.free_blocks + stats.cached_blocks + stats.in_use_blocks
                == self.config.num_blocks
            )
            assert {s.id: list(s.tokens) for s in snapshot.sequences} == self.model
            snapshots.append(snapshot)
        for impl, snapshot in zip(self.impls[1:], snapshots[1:]):
            assert snapshot == snapshots[0], (
                f"{impl.name} snapshot differs from {self.impls[0].name}"
            )
        self.check_gathers()

    def teardown(self) -> None:
        """Freeing every sequence and clearing the cache leaves all N blocks free."""
        if not self.caches:
            return
        for seq in sorted(self.model):
            self.apply("free", seq)
        self.apply("clear_cache")
        for cache in self.caches:
            assert cache.stats().free_blocks == self.config.num_blocks
            cache.check_invariants()
