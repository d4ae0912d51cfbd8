"""Named model shapes and the one random-weight model builder, shared by the tests, the demo and
the benchmarks (no downloads: mlx-lm's own model classes with random weights).

A shape is a dict of mlx-lm `ModelArgs` fields; `cache_shape` turns one into the `Config` fields
of a cache that holds that model's K/V. Importing this module needs neither MLX nor mlx-lm; only
`random_model` does.
"""

from __future__ import annotations

import importlib

LLAMA = dict(rms_norm_eps=1e-5, tie_word_embeddings=False)  # what every shape below shares

# Tests: two layers, 64 wide, 256 ids (mlx-lm's default rope).
TINY = dict(LLAMA, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256)  # fmt: skip
# The demo and the benchmarks on a CPU or a small device: four layers, GQA 8:2.
SMALL = dict(LLAMA, hidden_size=256, num_hidden_layers=4, intermediate_size=512,
             num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
             rope_theta=500000.0)  # fmt: skip
# Llama 3 8B: 32 layers, 32 query heads, 8 K/V heads of 128.
LLAMA3_8B = dict(LLAMA, hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 rope_theta=500000.0)  # fmt: skip


def cache_shape(shape: dict, dtype: str) -> dict:
    """The `Config` fields (num_layers, num_kv_heads, head_dim, dtype) of the model's K/V."""
    head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    return dict(
        num_layers=shape["num_hidden_layers"],
        num_kv_heads=shape["num_key_value_heads"],
        head_dim=head_dim,
        dtype=dtype,
    )


def random_model(shape: dict, arch: str = "llama", seed: int = 0, dtype="float32"):
    """mlx-lm's `arch` model (`mlx_lm.models.<arch>`) of the given shape, weights drawn from
    `mx.random.seed(seed)`, cast to `dtype` (a name such as "bfloat16", or an `mx.Dtype`) and
    evaluated. Raises whatever mlx-lm raises for arguments its class cannot take."""
    import mlx.core as mx

    module = importlib.import_module(f"mlx_lm.models.{arch}")
    args = module.ModelArgs.from_dict({"model_type": arch, **shape})
    mx.random.seed(seed)
    model = module.Model(args)
    dtype = getattr(mx, dtype) if isinstance(dtype, str) else dtype
    if dtype != mx.float32:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model
