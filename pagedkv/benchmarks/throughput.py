"""Model-level decode throughput: unmodified mlx-lm model code on the paged cache vs mlx-lm's KVCache.

B requests share a prefix and have private suffixes of equal length, so the dense side can run as
one plain `KVCache` batch. Both sides prefill, run 3 untimed warm-up decode steps, then greedy-decode
`steps` tokens; only those are timed, each step evaluated and the device synchronized. The paged side prefills each request on its own (the
shared prefix is computed once and then matched) and decodes through `store.batch`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

SMALL = dict(
    hidden_size=256,
    num_hidden_layers=4,
    intermediate_size=512,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=1024,
)
LLAMA3_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)


@dataclass
class ThroughputCell:
    model: str
    batch: int
    prefix: int
    steps: int
    dense_tok_s: float
    paged_tok_s: float
    same_tokens: bool

    @property
    def ratio(self) -> float:
        return self.paged_tok_s / self.dense_tok_s


def build_model(shape: dict, dtype: str):
    import mlx.core as mx
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama",
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        **shape,
    )
    mx.random.seed(0)
    model = llama.Model(args)
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model


def decode_throughput(
    model, name: str, batch: int, prefix: int, steps: int, block_size: int = 16
) -> ThroughputCell:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from pagedkv.mlx_lm import PagedKVStore

    vocab = model.args.vocab_size
    shared = [(31 * i + 7) % vocab for i in range(prefix)]
    prompts = [shared + [(97 * b + j) % vocab for j in range(16)] for b in range(batch)]

    def decode(call, first, warmup: int = 3):
        """Untimed warm-up steps (kernel set-up), then `steps` timed greedy steps."""
        tokens, out = first, []
        for _ in range(warmup):
            tokens = mx.argmax(call(tokens[:, None])[:, -1], axis=-1)
            mx.eval(tokens)
            out.append(tokens)
        mx.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            tokens = mx.argmax(call(tokens[:, None])[:, -1], axis=-1)
            mx.eval(tokens)
            out.append(tokens)
        mx.synchronize()
        elapsed = time.perf_counter() - start
        return batch * steps / elapsed, mx.stack(out, axis=1).tolist()

    dense_cache = make_prompt_cache(model)
    logits = model(mx.array(prompts), cache=dense_cache)
    dense_rate, dense_tokens = decode(
        lambda t: model(t, cache=dense_cache), mx.argmax(logits[:, -1], axis=-1)
    )
    dense_cache = None  # release the dense K/V before the paged run

    per_request = -(-(prefix + 16 + steps + 4) // block_size)
    store = PagedKVStore.for_model(model, num_blocks=batch * per_request + 8, block_size=block_size)
    sessions, firsts = [], []
    for prompt in prompts:
        session = store.open(prompt)
        logits = model(mx.array(session.remaining_prompt)[None], cache=session.caches)
        firsts.append(mx.argmax(logits[0, -1]))
        sessions.append(session)
    caches = store.batch(sessions)
    paged_rate, paged_tokens = decode(lambda t: model(t, cache=caches), mx.stack(firsts))
    for session in sessions:
        session.close()
    return ThroughputCell(
        name, batch, prefix, steps, dense_rate, paged_rate, dense_tokens == paged_tokens
    )
