"""Where a pipelined decode step's time goes: mlx-lm's caches against the paged store.

    python tools/step_split.py [CELLS] [VARIANT ...] [--small]   e.g.  tools/step_split.py 1,8,8r

A Llama-3-8B-shaped bfloat16 model (random weights), 2048-token prompts as in `pagedkv bench
throughput` (CELLS: batch sizes, `r` = the ragged batch; default 1,4,8,8r). Each side decodes as
mlx-lm's generate_step does (build step n+1, `mx.async_eval` it, go on) for 7 rounds of 64 steps,
the sides in rotated order; per side the median round's milliseconds per step, split into graph
building (Python, plus whatever evaluation the cache itself starts) and the `async_eval` call.

VARIANTs (experiments on the paged side only, each another paged store in the same run):
  every=N    the owner schedules a step's lazy writes every N layers instead of once per step
  lazyfirst  the step's first layer also writes lazily (two evaluations per step instead of three)
  lazyall    no write is scheduled inside the step: the pools are evaluated with the step's output,
             one evaluation per step as mlx-lm's (an experiment: not thread-safe)
  pool=K     the store has K times the blocks (K >= 1): a step time that grows with the pool
             means a write copies its whole pool (MLX donates the old pool's buffer only when
             nothing else holds it; the previous step's kernels hold it until they finish)
  split=N    the kernel always runs N splits
  stub=N     the kernel's launch replaced by N trivial kernels that copy the queries (N = 1 or
             2: one launch, or split + merge): the step with no attention work, the most any
             faster kernel could give
  functional the later layers' rows written as MLX array updates (`pool[slot] = row`), as
             before the eleventh session, instead of in place (kernels/write.py; CUDA only):
             what the in-place writes give
  history    every caller gets the lazy history, none the placeholders (callers.py): what the
             placeholders save
  views      the pools handed to the CUDA kernels as one-element views of their buffers
             (decode.POOL_VIEWS on): fewer CUDA graph ends if MLX counts whole inputs
  simt       16-bit pools on the one-lane-per-chunk kernel (paged_decode.cu), as GPUs before
             sm_80 run them, instead of the tensor-core pass 1: what the tensor cores give
`--small`: the 4-layer benchmark model (a CPU smoke run). Run it on the GPU; `MLX_MAX_OPS_PER_BUFFER` (MLX's ops per CUDA graph) is read by MLX at start.
"""

from __future__ import annotations

import statistics
import sys
import time
import types

import mlx.core as mx

import pagedkv.mlx_backend.kernels.decode as kernel
import pagedkv.mlx_backend.storage as storage
import pagedkv.mlx_lm.layer_cache as layer_cache
import pagedkv.mlx_lm.layer_decode as layer_decode
import pagedkv.mlx_lm.store as store_module
from pagedkv.benchmarks.throughput import dense_side, paged_side, prompts_for
from pagedkv.models import LLAMA3_8B, SMALL, random_model

ROUNDS, STEPS = 7, 64
KNOWN = ("every", "lazyfirst", "lazyall", "functional", "pool", "split", "stub", "history")
KNOWN += ("simt", "views")
_REAL = {
    "record": layer_cache.PagedLayerCache._record_step,
    "write": layer_cache.PagedLayerCache._write_in_step,
    "split": kernel.split_count,
    "unread": layer_cache.PagedLayerCache._history_unread,
    "launch": kernel.Launch.__call__,
    "arch": kernel.cuda_arch,
    "views": kernel.POOL_VIEWS,
}
_COPY = (
    mx.fast.cuda_kernel(  # the stub: y = x, one thread per element; the pools are read by no one
        name="step_split_stub",
        input_names=["x", "k_pool"],
        output_names=["y"],
        source="int i = blockIdx.x * blockDim.x + threadIdx.x; y[i] = x[i];",
    )
    if mx.cuda.is_available()
    else None
)


def timed_decode(call, first) -> tuple[float, float, float, float]:
    """(ms per step, of which building, of which async_eval; MB of memory at the peak beyond
    the start) over STEPS pipelined steps."""

    def step(tokens):
        return mx.argmax(call(tokens[:, None])[:, -1], axis=-1)

    tokens = first
    for _ in range(3):
        tokens = step(tokens)
        mx.eval(tokens)
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    build = launch = 0.0
    start = time.perf_counter()
    pending = None
    for _ in range(STEPS):
        t0 = time.perf_counter()
        following = step(tokens if pending is None else pending)
        t1 = time.perf_counter()
        mx.async_eval(following)
        launch += time.perf_counter() - t1
        build += t1 - t0
        pending = following
    mx.eval(pending)
    mx.synchronize()
    total = time.perf_counter() - start
    peak = (mx.get_peak_memory() - base) / 2**20
    return 1e3 * total / STEPS, 1e3 * build / STEPS, 1e3 * launch / STEPS, peak


def apply(variant: str) -> None:
    """Puts the paged side in `variant` ("" = the shipped code)."""
    options = dict(part.split("=") if "=" in part else (part, "") for part in variant.split("+"))
    unknown = set(options) - {"", *KNOWN}
    if unknown:
        sys.exit(f"step_split: unknown variant {sorted(unknown)}; known: {', '.join(KNOWN)}")
    layer_cache.PagedLayerCache._record_step = _REAL["record"]
    layer_cache.PagedLayerCache._write_in_step = _REAL["write"]
    storage.mx = mx
    kernel.split_count = _REAL["split"]
    layer_cache.PagedLayerCache._history_unread = _REAL["unread"]
    kernel.Launch.__call__ = _REAL["launch"]
    if kernel.cuda_arch is not _REAL["arch"] or "simt" in options:
        kernel._PLANS.clear()  # the plans remember which pass 1 they chose
    kernel.cuda_arch = (lambda: 0) if "simt" in options else _REAL["arch"]
    kernel.POOL_VIEWS = "views" in options or _REAL["views"]
    layer_cache.mx = layer_decode.mx = store_module.mx = mx
    if "pool" in options and int(options["pool"]) < 1:
        sys.exit("step_split: pool=K needs K >= 1")
    if "lazyall" in options:
        quiet = types.SimpleNamespace(**{k: getattr(mx, k) for k in dir(mx) if k[0] != "_"})
        quiet.async_eval = lambda *arrays: None
        storage.mx = layer_cache.mx = layer_decode.mx = store_module.mx = quiet
    if "stub" in options:
        launches = int(options["stub"])
        if _COPY is None or launches < 1:  # on the CPU routed decode never launches the kernel
            sys.exit("step_split: stub=N needs N >= 1 and a CUDA GPU (the kernel's launch path)")

        def stub(self, queries, k_pool, v_pool, sinks=None):
            out = queries
            for _ in range(launches):  # the queries' size is a multiple of 128 (head_dim 128)
                (out,) = _COPY(
                    inputs=[out, k_pool], grid=(queries.size, 1, 1), threadgroup=(128, 1, 1),
                    output_shapes=[queries.shape], output_dtypes=[queries.dtype],
                )  # fmt: skip
            return out

        kernel.Launch.__call__ = stub
    if "history" in options:
        layer_cache.PagedLayerCache._history_unread = lambda self, frame: False
    if "split" in options:
        kernel.split_count = lambda shape, batch, longest, n=int(options["split"]): n
    if "lazyfirst" in options:
        quiet = types.SimpleNamespace(**{k: getattr(mx, k) for k in dir(mx) if k[0] != "_"})
        quiet.async_eval = lambda *arrays: None
        storage.mx = quiet  # the backend's write leaves it lazy; the step schedules it

        def record(self, starts):
            step = _REAL["record"](self, starts)
            with self.store.lock:
                if not self.store.shared:
                    self.store.pending.setdefault(self.group, []).append(self.layer)
            return step

        layer_cache.PagedLayerCache._record_step = record
    if "every" in options:
        every = int(options["every"])

        def write(self, step, keys, values, caller):
            last = self.cache.config.num_layers - 1
            if (self.layer + 1) % every == 0 and self.layer != last and self.store.pending:
                self.store.schedule_pending()
            return _REAL["write"](self, step, keys, values, caller)

        layer_cache.PagedLayerCache._write_in_step = write
    if "functional" in options:  # last: it wraps whatever records the step now
        recorded = layer_cache.PagedLayerCache._record_step

        def functional(self, starts):
            step = recorded(self, starts)
            step.in_place = False
            return step

        layer_cache.PagedLayerCache._record_step = functional


def tokens_ahead(variant: str, prompts: list[list[int]], needed: int) -> int:
    """The positions per request a variant's store is sized for: `needed`, or with `pool=K` K
    times what the longest request needs (prompt and `needed`), less its prompt."""
    options = dict(part.split("=") if "=" in part else (part, "") for part in variant.split("+"))
    if "pool" not in options:
        return needed
    longest = max(len(p) for p in prompts)
    return int(options["pool"]) * (needed + longest) - longest


def main(argv: list[str]) -> None:
    small = "--small" in argv
    argv = [a for a in argv if a != "--small"]
    cells = [
        (int(c.rstrip("r")), c.endswith("r")) for c in (argv[:1] or ["1,4,8,8r"])[0].split(",")
    ]
    variants = [""] + argv[1:]
    for variant in variants:  # refuse a bad variant before the minutes of building and prefill
        apply(variant)
    apply("")
    model = random_model(SMALL if small else LLAMA3_8B, dtype="bfloat16")
    print(f"MLX {mx.__version__} on {mx.default_device()}; model built", flush=True)
    for batch, ragged in cells:
        prompts = prompts_for(model.args.vocab_size, batch, 2048, ragged)
        sides = {"dense": dense_side(model, prompts)}
        stores = []
        for variant in variants:
            apply("")
            ahead = tokens_ahead(variant, prompts, ROUNDS * (STEPS + 3) + 8)
            call, first, store = paged_side(model, prompts, ahead, 16, True)
            sides["paged " + (variant or "(shipped)")] = (call, first)
            stores.append(store)
        rounds: dict[str, list] = {name: [] for name in sides}
        order = list(sides)
        for r in range(ROUNDS):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                apply(name[6:].strip("()").replace("shipped", "") if name != "dense" else "")
                rounds[name].append(timed_decode(*sides[name]))
        apply("")
        dense = statistics.median(x[0] for x in rounds["dense"])
        print(f"== batch {batch}{' ragged' if ragged else ''}")
        for name, values in rounds.items():
            total, build, launch, peak = sorted(values)[ROUNDS // 2]
            print(
                f"  {name:24s} {total:6.2f} ms/step  build {build:5.2f}  async_eval {launch:5.2f}"
                f"  dense/this {dense / total:.3f}  peak +{peak:7.1f} MB",
                flush=True,
            )
        for store in stores:
            store.close()


if __name__ == "__main__":
    main(sys.argv[1:])
