"""What paging buys: memory per shared prefix, prefill avoided, and model-level decode throughput.

Memory and prefill are counts, recorded in extra_info (the timing is of the bookkeeping only).
Throughput times only the decode steps, paged vs mlx-lm KVCache, in the same run.
"""

import pytest

pytest.importorskip("mlx.core", reason="the payoff benchmarks need MLX (pagedkv[mlx])")
from pagedkv.benchmarks.memory import multi_turn_chat, shared_prefix_cell  # noqa: E402
from pagedkv.benchmarks.throughput import decode_throughput  # noqa: E402
from pagedkv.mlx_backend import PagedCache  # noqa: E402
from pagedkv.models import SMALL, random_model  # noqa: E402


@pytest.mark.benchmark(group="memory per shared prefix")
@pytest.mark.parametrize("prefix", [512, 2048, 8192])
@pytest.mark.parametrize("requests", [1, 8, 32])
def bench_shared_prefix_memory(record_device, requests, prefix):
    cell = record_device.pedantic(shared_prefix_cell, args=(PagedCache, requests, prefix), rounds=1)
    assert cell.paged_bytes <= cell.dense_bytes
    assert cell.prefill_avoided == (requests - 1) * (prefix // 16) * 16
    record_device.extra_info.update(
        paged_bytes=cell.paged_bytes,
        dense_bytes=cell.dense_bytes,
        saved_pct=cell.saved_pct,
        prefill_avoided=cell.prefill_avoided,
    )


@pytest.mark.benchmark(group="prefill avoided: multi-turn chat")
def bench_multi_turn_chat(record_device):
    cell = record_device.pedantic(multi_turn_chat, args=(PagedCache,), rounds=1)
    assert cell.prefill_avoided > 0
    record_device.extra_info.update(
        prompt_tokens=cell.prompt_tokens, prefill_avoided=cell.prefill_avoided
    )


@pytest.mark.benchmark(group="decode throughput (small model)")
@pytest.mark.parametrize("batch", [1, 4, 8])
def bench_decode_throughput(record_device, batch):
    model = random_model(SMALL)
    steps = 2 if record_device.disabled else 16
    cell = record_device.pedantic(
        decode_throughput, args=(model, "small", batch, 128, steps), rounds=1
    )
    assert cell.same_tokens
    record_device.extra_info.update(
        dense_tok_s=cell.dense_tok_s, paged_tok_s=cell.paged_tok_s, ratio=cell.ratio
    )
