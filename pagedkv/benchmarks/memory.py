"""What paging saves: K/V memory per concurrent shared prefix, and prefill tokens avoided.

Counts come from the MLX backend's metadata (store_kv=False), so large shapes cost nothing to
simulate. Bytes use a Llama-3-8B-shaped cache: 32 layers, 8 K/V heads, head_dim 128, float16
(128 KiB per token). mlx-lm's dense `KVCache` grows in steps of `KVCache.step` (256) tokens per
request, and that is what the dense column counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedkv.config import Config, ceil_div
from pagedkv.models import LLAMA3_8B, cache_shape

LLAMA3_8B_KV = cache_shape(LLAMA3_8B, "float16")  # the Config fields of its K/V
SUFFIX = 64
QUICK = dict(requests=(1, 4, 16), prefixes=(512, 2048))
FULL = dict(requests=(1, 2, 4, 8, 16, 32), prefixes=(512, 1024, 2048, 4096, 8192))


def dense_step() -> int:
    try:
        from mlx_lm.models.cache import KVCache

        return KVCache.step
    except ImportError:  # mlx-lm's value as of 0.32
        return 256


@dataclass
class MemoryCell:
    requests: int
    prefix: int
    paged_bytes: int
    dense_bytes: int
    prompt_tokens: int
    prefill_avoided: int

    @property
    def saved_pct(self) -> float:
        return 100 * (1 - self.paged_bytes / self.dense_bytes)


def shared_prefix_cell(cache_class, requests: int, prefix: int, block_size: int = 16) -> MemoryCell:
    """N requests = the same P-token prefix + a private 64-token suffix, all live at once."""
    per_request = ceil_div(prefix + SUFFIX, block_size)
    config = Config(
        num_blocks=requests * per_request + 8, block_size=block_size, store_kv=False, **LLAMA3_8B_KV
    )
    cache = cache_class(config)
    prefix_tokens = [(31 * i + 7) % 32000 for i in range(prefix)]
    for r in range(requests):
        seq, _ = cache.add_sequence(prefix_tokens + [(r * 101 + j) % 32000 for j in range(SUFFIX)])
        cache.commit(seq)  # prefill done: later requests may share it
    stats = cache.stats()
    per_token = config.bytes_per_block // block_size
    step = dense_step()
    dense = requests * (ceil_div(prefix + SUFFIX, step) * step) * per_token
    return MemoryCell(
        requests,
        prefix,
        stats.in_use_blocks * config.bytes_per_block,
        dense,
        stats.prompt_tokens,
        stats.prefill_tokens_avoided,
    )


@dataclass
class ChatCell:
    turns: int
    prompt_tokens: int
    prefill_avoided: int

    @property
    def avoided_pct(self) -> float:
        return 100 * self.prefill_avoided / self.prompt_tokens


def multi_turn_chat(
    cache_class,
    turns: int = 8,
    system: int = 512,
    user: int = 48,
    answer: int = 96,
    block_size: int = 16,
) -> ChatCell:
    """One conversation: each turn's prompt is the whole history plus a new user message; the
    answer is decoded into the same sequence and committed, then the request ends."""
    config = Config(
        num_blocks=ceil_div(system + turns * (user + answer), block_size) * 2 + 8,
        block_size=block_size,
        store_kv=False,
        **LLAMA3_8B_KV,
    )
    cache = cache_class(config)
    history = [(13 * i + 5) % 32000 for i in range(system)]
    for turn in range(turns):
        history += [(turn * 977 + j) % 32000 for j in range(user)]
        seq, _ = cache.add_sequence(history)
        reply = [(turn * 733 + j + 1) % 32000 for j in range(answer)]
        cache.extend(seq, reply)
        history += reply
        cache.commit(seq)
        cache.free(seq)
    stats = cache.stats()
    return ChatCell(turns, stats.prompt_tokens, stats.prefill_tokens_avoided)
