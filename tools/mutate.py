"""Hand-written mutants: break the code on purpose and check that the tests notice.

    make mutate                      (or: PYTHONPATH=. python tools/mutate.py [name-filter])

Each mutant replaces one exact snippet in one module, runs the tests that should catch it (the
state machines under the ci budget without shrinking, other tests under dev with a fixed seed) and
restores the file, whatever happens. A mutant is *caught* when
those tests fail, *missed* when they pass: a missed mutant is a blind spot, so add the test that
would have failed. Not part of CI (a run takes minutes). Exit status 1 if any mutant is missed or
no longer applies (its snippet changed: update the mutant).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNIT, PROPERTY = "tests/unit", "tests/property"
DIFF = "tests/property/test_differential_machine.py"

# (name, module, snippet, replacement, tests)
MUTANTS = [
    # the spec
    (
        "spec: prefix hits may cover the last token",
        "pagedkv/spec/cache.py",
        "for i in range((len(tokens) - 1) // size)]",
        "for i in range(len(tokens) // size)]",
        UNIT,
    ),
    (
        "spec: shared blocks writable",
        "pagedkv/spec/cache.py",
        "return self.pool.refcounts[block] == 1 and",
        "return self.pool.refcounts[block] >= 1 and",
        UNIT,
    ),
    (
        "spec: fork does not count avoided prefill",
        "pagedkv/spec/cache.py",
        "self.counters.prefill_tokens_avoided += len(parent.tokens)",
        "pass",
        UNIT,
    ),
    (
        "spec: trim releases head first",
        "pagedkv/spec/cache.py",
        "for block in reversed(seq.table[keep:]):",
        "for block in seq.table[keep:]:",
        PROPERTY,
    ),
    (
        "spec: eviction ties to the highest id",
        "pagedkv/spec/index.py",
        "key=lambda n: (n.last_used, n.block)",
        "key=lambda n: (n.last_used, -n.block)",
        UNIT,
    ),
    (
        "spec: pinned blocks counted as reclaimable",
        "pagedkv/spec/index.py",
        "and node.block not in pinned",
        "",
        UNIT,
    ),
    (
        "spec: freed blocks join the queue's head",
        "pagedkv/spec/pool.py",
        "self.free_queue.append(block)",
        "self.free_queue.appendleft(block)",
        UNIT,
    ),
    (
        "spec: token 2**31 accepted",
        "pagedkv/spec/checks.py",
        "MAX_TOKEN = 2**31 - 1",
        "MAX_TOKEN = 2**31",
        UNIT,
    ),
    (
        "spec: 0-d token arrays accepted",
        "pagedkv/spec/checks.py",
        "if tokens.ndim != 1 or",
        "if tokens.ndim > 1 or",
        UNIT,
    ),
    # the backend
    (
        "backend: release does not touch cached blocks",
        "pagedkv/mlx_backend/allocation.py",
        "            node.last_used = now\n            if refcounts[block] == 0:",
        "            if refcounts[block] == 0:",
        DIFF,
    ),
    (
        "backend: matched cached block not marked referenced",
        "pagedkv/mlx_backend/cache.py",
        "            if refcounts[node.block] == 1:\n                self.index.referenced(node)",
        "            if False:\n                self.index.referenced(node)",
        UNIT,
    ),
    (
        "backend: duplicates counted on every commit",
        "pagedkv/mlx_backend/cache.py",
        "elif node.block != block and block >= 0 and i >= seq.committed:",
        "elif node.block != block and block >= 0:",
        UNIT,
    ),
    (
        "backend: blocked count never decreases",
        "pagedkv/mlx_backend/index.py",
        "self.num_blocked += 1 if blocked else -1",
        "self.num_blocked += 1 if blocked else 0",
        UNIT,
    ),
    (
        "backend: pinned chain not subtracted",
        "pagedkv/mlx_backend/index.py",
        "return len(self.by_block) - self.num_blocked - len(newly_blocked)",
        "return len(self.by_block) - self.num_blocked",
        DIFF,
    ),
    (
        "backend: token 2**31 accepted",
        "pagedkv/mlx_backend/checks.py",
        "_TOKEN_LIMIT = 1 << 31",
        "_TOKEN_LIMIT = (1 << 31) + 1",
        UNIT,
    ),
    (
        "backend: deques accepted as tokens",
        "pagedkv/mlx_backend/checks.py",
        "_SEQUENCES = (list, tuple, range)",
        "_SEQUENCES = (list, tuple, range, __import__('collections').deque)",
        UNIT,
    ),
    (
        "backend: bool scale accepted",
        "pagedkv/mlx_backend/checks.py",
        "if isinstance(value, _BOOL_TYPES) or not isinstance(",
        "if not isinstance(",
        UNIT,
    ),
    (
        "backend: no lock",
        "pagedkv/mlx_backend/threads.py",
        "        with self._lock:\n            return",
        "        if True:\n            return",
        "tests/unit/test_threads.py",
    ),
    (
        "backend: pools not scheduled after a write",
        "pagedkv/mlx_backend/storage.py",
        "        mx.async_eval(pool_k, pool_v)",
        "        pass",
        "tests/unit/test_threads.py",
    ),
    (
        "backend: attention ignores scale",
        "pagedkv/mlx_backend/attention.py",
        "    scale = checks.as_scale(scale, cfg.head_dim)\n    window",
        "    scale = checks.as_scale(None, cfg.head_dim)\n    window",
        UNIT,
    ),
    (
        "spec: invariants ignore refcounts",
        "pagedkv/spec/observe.py",
        '            refcount == entries,\n            "I4",',
        '            True,\n            "I4",',
        UNIT,
    ),
    (
        "backend: invariants ignore refcounts",
        "pagedkv/mlx_backend/observe.py",
        '            seen[block] == refcounts[block],\n            "I4",',
        '            True,\n            "I4",',
        UNIT,
    ),
    (
        "backend: invariants ignore the blocked count",
        "pagedkv/mlx_backend/observe.py",
        'need(index.num_blocked == len(blocked), "B3", "blocked count")',
        "pass",
        "tests/unit/test_stats.py",
    ),
    # the adapter
    (
        "adapter: multi-token batched calls accepted",
        "pagedkv/mlx_lm/layer_cache.py",
        "if batch > 1 and count > 1:",
        "if False:",
        "tests/parity",
    ),
    (
        "adapter: a trimmed session keeps its prompt tail",
        "pagedkv/mlx_lm/session.py",
        "        del self.prompt[furthest:]",
        "        pass",
        "tests/parity",
    ),
    (
        "adapter: padded tables cached by clock only",
        "pagedkv/mlx_lm/store.py",
        "key = (group, cache.clock, tuple(s.seqs[group] for s in sessions))",
        "key = (group, cache.clock)",
        UNIT,
    ),
    (
        "adapter: steps of several groups not under the store lock",
        "pagedkv/mlx_lm/layer_cache.py",
        "with self.store.lock:  # no other thread",
        "if True:  # no other thread",
        "tests/unit/test_threads.py",
    ),
    (
        "adapter: open of several groups not under the store lock",
        "pagedkv/mlx_lm/store.py",
        "        with self.lock:\n            return self._open(",
        "        if True:\n            return self._open(",
        "tests/unit/test_threads.py",
    ),
    (
        "callers: reads after the fetch allowed",
        "pagedkv/mlx_lm/callers.py",
        "if isinstance(node, ast.Name) and node.id in names and id(node) not in allowed:",
        "if False:",
        "tests/unit/test_callers.py",
    ),
    (
        "callers: closures may name the history",
        "pagedkv/mlx_lm/callers.py",
        "if any(names & _names_in(scope) for scope in nested):",
        "if False:",
        "tests/unit/test_callers.py",
    ),
    (
        "callers: stale source trusted",
        "pagedkv/mlx_lm/callers.py",
        "same = body is not None and _instructions(body) == _instructions(code)",
        "same = body is not None",
        "tests/unit/test_callers.py",
    ),
    (
        "placeholders: handed out without the module routing the helper",
        "pagedkv/mlx_lm/layer_cache.py",
        "if frame.f_globals.get(HELPER) is not routing.paged_sdpa:",
        "if False:",
        "tests/parity/test_placeholders.py",
    ),
    (
        "placeholders: a declined call keeps them",
        "pagedkv/mlx_lm/layer_cache.py",
        "if out is None and keys is self._unfetched[0]:",
        "if False:",
        "tests/parity/test_placeholders.py",
    ),
    (
        "placeholders: a call on other keys uses them up",
        "pagedkv/mlx_lm/layer_cache.py",
        "            return None, keys, values\n        self._fetched = None",
        "            self._fetched = None\n            return None, keys, values\n        self._fetched = None",
        "tests/parity/test_placeholders.py",
    ),
    # the split-K reference and the kernel's dispatch (issue 9)
    (
        "split-k: the merge does not rescale to the common max",
        "pagedkv/spec/split_k.py",
        "total_l = sum(p.l * np.exp(p.m - top) for p in parts)",
        "total_l = sum(p.l for p in parts)",
        "tests/unit/test_split_k.py",
    ),
    (
        "split-k: a new maximum does not rescale the running sums",
        "pagedkv/spec/split_k.py",
        "state.l * rescale + weights.sum(axis=1),",
        "state.l + weights.sum(axis=1),",
        "tests/unit/test_split_k.py",
    ),
    (
        "split-k: sinks ignored",
        "pagedkv/spec/split_k.py",
        "    if sinks is not None:  # a sink",
        "    if False:  # a sink",
        "tests/unit/test_split_k.py",
    ),
    (
        "split-k: the window start ignored",
        "pagedkv/spec/split_k.py",
        "first, length = int(bounds[b, 0]), int(bounds[b, 1])",
        "first, length = 0, int(bounds[b, 1])",
        "tests/unit/test_split_k.py",
    ),
    (
        "split-k: scale not applied",
        "pagedkv/spec/split_k.py",
        "* np.float32(scale)  # [G, D]",
        "* np.float32(1.0)  # [G, D]",
        "tests/unit/test_split_k.py",
    ),
    (
        "split-k: the last split cut one key short",
        "pagedkv/spec/split_k.py",
        "end = min(length, (begin_block + per_split) * block_size)",
        "end = min(length - 1, (begin_block + per_split) * block_size)",
        "tests/unit/test_split_k.py",
    ),
    (
        "dispatch: the self-check ignores speed",
        "pagedkv/mlx_backend/kernels/dispatch.py",
        "if kernel_s >= gather_s:",
        "if False:",
        "tests/unit/test_dispatch.py",
    ),
    (
        "dispatch: the self-check ignores the error",
        "pagedkv/mlx_backend/kernels/dispatch.py",
        "if not error <= tolerance:  # also rejects NaN",
        "if error > tolerance:",
        "tests/unit/test_dispatch.py",
    ),
    (
        "dispatch: the self-check runs at every call",
        "pagedkv/mlx_backend/kernels/dispatch.py",
        "if key not in self.verdicts:",
        "if True:",
        "tests/unit/test_dispatch.py",
    ),
    (
        "dispatch: auto trusts the unverified Metal kernel",
        "pagedkv/mlx_backend/kernels/dispatch.py",
        'if backend_name == "cuda":  # verified',
        'if backend_name in ("cuda", "metal"):  # verified',
        "tests/unit/test_dispatch.py",
    ),
    (
        "dispatch: kernel mode accepts an uncovered shape",
        "pagedkv/mlx_backend/kernels/dispatch.py",
        "            if unsupported:\n                raise ConfigError",
        "            if False:\n                raise ConfigError",
        "tests/unit/test_dispatch.py",
    ),
    (
        "dispatch: gather mode ignored",
        "pagedkv/mlx_backend/kernels/dispatch.py",
        '        if chosen == "gather":\n            return False',
        "        if False:\n            return False",
        "tests/unit/test_dispatch.py",
    ),
    (
        "decode: splits shorter than the minimum",
        "pagedkv/mlx_backend/kernels/decode.py",
        "longest // MIN_SPLIT_KEYS, MAX_SPLITS",
        "longest, MAX_SPLITS",
        "tests/unit/test_dispatch.py",
    ),
    (
        "decode: no cap on the split count",
        "pagedkv/mlx_backend/kernels/decode.py",
        "min(wanted, longest // MIN_SPLIT_KEYS, MAX_SPLITS)",
        "min(wanted, longest // MIN_SPLIT_KEYS)",
        "tests/unit/test_dispatch.py",
    ),
    (
        "decode: rows not a multiple of 16 bytes accepted",
        "pagedkv/mlx_backend/kernels/decode.py",
        "if head_dim * pool_dtype.size % 16 or head_dim > MAX_HEAD_DIM:",
        "if head_dim > MAX_HEAD_DIM:",
        "tests/unit/test_dispatch.py",
    ),
    (
        "decode: any split count accepted",
        "pagedkv/mlx_backend/kernels/decode.py",
        "if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:",
        "if False:",
        "tests/unit/test_dispatch.py",
    ),
    (
        "decode: the query tile ignores the merge buffer",
        "pagedkv/mlx_backend/kernels/decode.py",
        "t * per_query <= MERGE_BUFFER_BYTES",
        "True",
        "tests/unit/test_dispatch.py",
    ),
    (
        "decode: tensor cores for float32 queries over a 16-bit pool",
        "pagedkv/mlx_backend/kernels/decode.py",
        "        and query_dtype == pool_dtype\n",
        "",
        "tests/unit/test_dispatch.py",
    ),
    (
        "decode: tensor cores for head_dim 256",
        "pagedkv/mlx_backend/kernels/decode.py",
        "        and head_dim <= 128\n",
        "",
        "tests/unit/test_dispatch.py",
    ),
    (
        "decode: tensor cores on GPUs before sm_80",
        "pagedkv/mlx_backend/kernels/decode.py",
        "and cuda_arch() >= 80",
        "and cuda_arch() >= 0",
        "tests/unit/test_dispatch.py",
    ),
    (
        "decode: the merge kernel from the tensor-core source",
        "pagedkv/mlx_backend/kernels/decode.py",
        '_kernel("cuda" if p == "reduce" else pass1,',
        "_kernel(pass1,",
        "tests/unit/test_dispatch.py",
    ),
    (
        "decode: a tensor-core query tile past the 8 mma columns",
        "pagedkv/mlx_backend/kernels/decode.py",
        "return max(t for t in range(1, 9) if self.group % t == 0)",
        "return max(t for t in range(1, 17) if self.group % t == 0)",
        "tests/unit/test_dispatch.py",
    ),
    (
        "decode: the tensor-core pass 1 aims at the SIMT kernel's wave",
        "pagedkv/mlx_backend/kernels/decode.py",
        "target = TARGET_BLOCKS_MMA if shape.tensor_cores else TARGET_BLOCKS",
        "target = TARGET_BLOCKS",
        "tests/unit/test_dispatch.py",
    ),
    (
        "source: the tensor-core pass 1 without the shared merge and epilogue",
        "pagedkv/mlx_backend/kernels/source.py",
        'shared = sections("cuda" if backend == "cuda_mma" else backend)',
        "shared = sections(backend)",
        "tests/unit/test_kernel_sources.py",
    ),
    (
        "adapter: batch accepts anything",
        "pagedkv/mlx_lm/store.py",
        "if not isinstance(sessions, (list, tuple, Session)):",
        "if False:",
        UNIT,
    ),
]


def run(name: str, module: str, snippet: str, replacement: str, tests: str) -> str:
    path = ROOT / module
    original = path.read_text()
    if original.count(snippet) != 1:
        return "STALE"
    path.write_text(original.replace(snippet, replacement))
    try:
        profile = "mutate" if "property" in tests else "dev"  # machines: ci budget, no shrinking
        env = dict(os.environ, HYPOTHESIS_PROFILE=profile, PYTHONPATH=str(ROOT))
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-x",
                "-q",
                "-p",
                "no:cacheprovider",
                "--benchmark-disable",
                "--hypothesis-seed=0",
                *tests.split(),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=300,
        )
        return "caught" if result.returncode != 0 else "MISSED"
    except subprocess.TimeoutExpired:
        return "caught (timeout)"
    finally:
        path.write_text(original)


def main() -> int:
    selected = [m for m in MUTANTS if len(sys.argv) < 2 or sys.argv[1] in m[0]]
    outcomes = []
    for mutant in selected:
        start = time.perf_counter()
        outcome = run(*mutant)
        outcomes.append(outcome)
        print(f"{outcome:>8}  {mutant[0]}  ({time.perf_counter() - start:.0f}s)", flush=True)
    caught = sum(o.startswith("caught") for o in outcomes)
    print(f"{caught}/{len(outcomes)} mutants caught")
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
