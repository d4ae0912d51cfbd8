"""Tiny random-weight models from mlx-lm's own model classes (no downloads), and a tokenizer."""

from __future__ import annotations

import importlib

import mlx.core as mx

BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=256,
    tie_word_embeddings=False,
)
ARCHITECTURES = {
    "llama": dict(BASE),
    "qwen3": dict(BASE, head_dim=16, max_position_embeddings=512, rope_theta=10000.0),
    "qwen2": dict(BASE, max_position_embeddings=512, rope_theta=10000.0),
}


def tiny_model(arch: str, seed: int = 0, dtype=mx.float32):
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    args = module.ModelArgs.from_dict({"model_type": arch, **ARCHITECTURES[arch]})
    mx.random.seed(seed)
    model = module.Model(args)
    if dtype != mx.float32:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def tiny_tokenizer():
    """A word-level tokenizer over 256 ids built in memory, wrapped as mlx-lm expects."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(256)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="w255", unk_token="w0")
    return TokenizerWrapper(fast)


def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


def prompt_tokens(length: int, seed: int) -> list[int]:
    mx.random.seed(1000 + seed)
    return [int(t) for t in mx.random.randint(0, 250, (length,)).tolist()]


def assert_all_released(pool, store) -> None:
    """After every request's caches are dropped: no block held, every opened request released,
    invariants intact; then the store gives the model its attention back."""
    import gc

    gc.collect()  # finalizers queue the dropped requests' blocks
    pool.reap()
    assert pool.held_blocks() == 0 and pool.released == pool.opened
    store.check_invariants()
    store.close()
