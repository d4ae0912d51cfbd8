"""Host cost of one decode step: mlx-lm's KVCache against the paged store (routed attention).

    python tools/host_step.py LABEL [BATCH] [noasync] [kernelstub] [prof]

A 32-layer bfloat16 llama too small for the GPU to matter, so the figures are host costs: the time
to build one step's graph (Python) and to evaluate it (MLX's per-node work), per side, in 7
interleaved rounds of 30 steps (the median round). `noasync` drops every `mx.async_eval` of the
pools (an experiment only: not thread-safe); `kernelstub` (CPU only) makes routed decode take the GPU's path —
the kernel dispatched, its launch prepared and called — with kernel objects that return zeros, so
graph building is the GPU's host work (evaluation is then meaningless); `prof` prints a cProfile
of both sides. Run it on the GPU; on the CPU evaluation is the model's arithmetic, not host work.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
import types

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from pagedkv.mlx_lm import PagedKVStore
from pagedkv.models import SMALL, random_model

SHAPE = dict(SMALL, num_hidden_layers=32)  # 32 layers of the small benchmark model


def without_async_eval() -> None:
    import pagedkv.mlx_backend.storage as storage
    import pagedkv.mlx_lm.layer_cache as layer_cache
    import pagedkv.mlx_lm.layer_decode as layer_decode
    import pagedkv.mlx_lm.store as store

    fake = types.SimpleNamespace(**{k: getattr(mx, k) for k in dir(mx) if not k.startswith("__")})
    fake.async_eval = lambda *arrays: None
    # the backend's writes, the step's scheduling
    storage.mx = layer_cache.mx = layer_decode.mx = store.mx = fake


def with_kernel_stub() -> None:
    import pagedkv.mlx_backend.kernels.decode as decode

    class Stub:  # what a kernel object returns, without a kernel
        def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

    decode.backend = lambda: "cuda"
    decode._kernel = lambda *args: Stub()  # every part, every variant


def main(label: str, flags: list[str]) -> None:
    batch = next((int(f) for f in flags if f.isdigit()), 1)
    if "noasync" in flags:
        without_async_eval()
    stub = "kernelstub" in flags
    if stub:
        with_kernel_stub()
    model = random_model(SHAPE, dtype="bfloat16")
    prompt = list(range(64))
    store = PagedKVStore.for_model(model, num_blocks=64 * batch + 64)
    sessions = [store.open(prompt + [i]) for i in range(batch)]
    for session in sessions:
        mx.eval(model(mx.array(session.remaining_prompt)[None], cache=session.caches))
    paged = store.batch(sessions) if batch > 1 else sessions[0].caches
    dense = make_prompt_cache(model)
    mx.eval(model(mx.array([prompt] * batch), cache=dense))
    token = mx.zeros((batch, 1), mx.int32)

    def run(caches, steps: int = 30) -> tuple[float, float]:
        build = evaluate = 0.0
        for _ in range(steps):
            start = time.perf_counter()
            out = model(token, cache=caches)
            built = time.perf_counter()
            mx.eval(out)
            if stub:  # the stub's output does not depend on the pools: evaluate them too
                for cache in store.groups:
                    with cache._lock:
                        mx.eval(cache.storage.keys, cache.storage.values)
            mx.synchronize()
            build += built - start
            evaluate += time.perf_counter() - built
        return 1e3 * build / steps, 1e3 * evaluate / steps

    run(dense, 5)
    run(paged, 5)
    rounds = {"dense": [], "paged": []}
    for _ in range(7):
        rounds["dense"].append(run(dense))
        rounds["paged"].append(run(paged))
    d, p = (sorted(rounds[s], key=sum)[3] for s in ("dense", "paged"))
    print(
        f"{label} B{batch}: dense build {d[0]:.2f} eval {d[1]:.2f} total {sum(d):.2f} | "
        f"paged build {p[0]:.2f} eval {p[1]:.2f} total {sum(p):.2f} ms/step",
        flush=True,
    )
    if "prof" in flags:
        for name, caches in (("paged", paged), ("dense", dense)):
            profile = cProfile.Profile()
            profile.enable()
            run(caches)
            profile.disable()
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(20)
            print(name, text.getvalue())


if __name__ == "__main__":
    print(f"MLX {mx.__version__} on {mx.default_device()}")
    main(sys.argv[1] if len(sys.argv) > 1 else "step", sys.argv[2:])
