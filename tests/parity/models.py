"""Tiny random-weight models of three architectures (`pagedkv.models.random_model` at the shape
`TINY`), and a tokenizer."""

from __future__ import annotations

import mlx.core as mx

from pagedkv.models import TINY, random_model

ARCHITECTURES = {
    "llama": dict(TINY),
    "qwen3": dict(TINY, head_dim=16, max_position_embeddings=512, rope_theta=10000.0),
    "qwen2": dict(TINY, max_position_embeddings=512, rope_theta=10000.0),
}


def tiny_model(arch: str, seed: int = 0, dtype=mx.float32):
    return random_model(ARCHITECTURES[arch], arch, seed, dtype)


def _fast_tokenizer():
    """A word-level tokenizer over 256 ids ("w0" … "w255", "w255" the end), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(256)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="w255", unk_token="w0")


def tiny_tokenizer():
    """The word-level tokenizer, wrapped as mlx-lm expects."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(_fast_tokenizer())


def save_tiny_llama(path, chat_template: str | None = None) -> str:
    """The tiny llama (seed 3) and the tokenizer saved in `path` as mlx-lm loads a model."""
    from mlx_lm.utils import save_config, save_model

    save_model(path, tiny_model("llama", seed=3))
    save_config(dict(ARCHITECTURES["llama"], model_type="llama"), path / "config.json")
    fast = _fast_tokenizer()
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return str(path)


def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


def paged_tokens(session, model, max_tokens: int) -> list[int]:
    """Greedy tokens of mlx-lm's `generate_step` on a session's paged caches (the part of its
    prompt that is not cached is fed)."""
    from mlx_lm.generate import generate_step

    steps = generate_step(
        mx.array(session.remaining_prompt),
        model,
        max_tokens=max_tokens,
        sampler=greedy,
        prompt_cache=session.caches,
    )
    return [t for t, _ in steps]


def prompt_tokens(length: int, seed: int) -> list[int]:
    """Random token ids, reproducible by seed. Draw them on one thread: this reseeds MLX's global
    random key, which concurrent threads would share (a race that crashed a threaded test)."""
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
