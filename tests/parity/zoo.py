"""Every architecture in mlx-lm's models folder, as a tiny random-weight model.

`SMALL` holds small values for every argument name the `ModelArgs` classes use (`from_dict` keeps
only the names a class declares), `OVERRIDES` what one architecture needs besides: layer patterns
short enough for two layers, rope settings, and so on. Windows are 8 positions so the parity
tests decode past them.
"""

from __future__ import annotations

import pkgutil

import mlx_lm.models

from pagedkv.models import random_model

H = 64
SMALL = dict(
    hidden_size=H,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    rms_norm_eps=1e-5,
    layer_norm_eps=1e-5,
    layer_norm_epsilon=1e-5,
    norm_eps=1e-5,
    layernorm_epsilon=1e-5,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    use_bias=False,
    num_experts=4,
    num_experts_per_tok=2,
    n_routed_experts=4,
    n_shared_experts=1,
    num_shared_experts=1,
    num_local_experts=4,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    norm_topk_prob=True,
    kv_lora_rank=32,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    partial_rotary_factor=0.5,
    sliding_window=8,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    moe_layer_freq=1,
    n_embd=H,
    n_head=4,
    n_layer=2,
    n_positions=512,
    n_ctx=512,
    n_inner=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    hidden_dim=H,
    d_model=H,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    block_size=512,
    model_dim=H,
    rotary_emb_base=10000.0,
    rotary_pct=0.5,
    use_qk_norm=True,
    qk_norm=True,
    post_norm=False,
    logits_scaling=1.0,
    attention_multiplier=0.25,
    embedding_multiplier=1.0,
    residual_multiplier=1.0,
    moe_topk=2,
    num_shared_expert=1,
    use_mixed_mlp_moe=False,
    use_cla=False,
    cla_share_factor=1,
    state_size=8,
    conv_kernel=4,
    use_conv_bias=True,
    time_step_rank=8,
    n_groups=1,
    mamba_num_heads=4,
    mamba_head_dim=16,
    ssm_state_size=8,
    mamba_proj_bias=False,
    mamba_d_conv=4,
    mamba_d_state=8,
    mamba_expand=2,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    dim_model_base=H,
    scale_depth=1.0,
    scale_emb=1.0,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    hidden_act="relu2",
    conv_bias=False,
    conv_L_cache=3,
    use_expert_bias=True,
    num_dense_layers=1,
    attention_window_size=8,
    conv1d_width=4,
    logits_soft_cap=30.0,
    use_qkv_bias=False,
    moe_num_experts=4,
    intermediate_size_mlp=128,
    no_rope_layers=[1, 1],
    rotary_dim=8,
    ffn_hidden_size=128,
    expert_ffn_hidden_size=32,
    zero_expert_num=0,
    zero_expert_type="identity",
    mla_scale_q_lora=True,
    mla_scale_kv_lora=True,
    attention_method="MLA",
    sliding_window_size=8,
    swa_rope_theta=10000.0,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=2,
    swa_head_dim=16,
    swa_v_head_dim=16,
    add_swa_attention_sink_bias=False,
    add_full_attention_sink_bias=False,
    index_head_dim=16,
    index_n_heads=2,
    index_topk=8,
    num_attention_groups=2,
    a_low_rank_dim=8,
    v_low_rank_dim=8,
    gate_low_rank_dim=8,
    decay_low_rank_dim=8,
    ff_intermediate_size=128,
    gegelu_limit=20.0,
    dense_attention_every_n_layers=2,
    num_transformer_layers=2,
    ffn_dim_divisor=8,
    num_query_heads=[4, 4],
    ffn_multipliers=[1.0, 2.0],
    linear_allow_neg_eigval=False,
)

SW = ["sliding_attention", "full_attention"]
OVERRIDES = {
    "afm7": dict(num_kv_reuse_layers=1, num_layers=3),
    "afmoe": dict(layer_types=SW, num_dense_layers=1),
    "baichuan_m1": dict(sliding_window_layers=[0], conv_window=2),
    "bailing_hybrid": dict(layer_group_size=2, group_norm_size=1),
    "bailing_moe_linear": dict(layer_group_size=2, group_norm_size=1),
    "cohere2": dict(sliding_window_pattern=2),
    "dbrx": dict(
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
        attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
    ),
    "deepseek_v2": dict(
        rope_scaling=dict(
            factor=1.0,
            original_max_position_embeddings=512,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=1.0,
        )
    ),
    "exaone4": dict(rope_scaling=None, sliding_window_pattern="LG"),
    "exaone_moe": dict(layer_types=SW, is_moe_layer=[False, True]),
    "gear": dict(layer_types=SW),
    "gemma3": dict(sliding_window_pattern=2),
    "gemma3_text": dict(sliding_window_pattern=2),
    "gemma3n": dict(
        num_hidden_layers=4,
        layer_types=SW * 2,
        num_kv_shared_layers=2,  # layers 2-3 read the K/V of layers 0-1
        vocab_size_per_layer_input=256,
        hidden_size_per_layer_input=8,
        rope_local_base_freq=10000.0,
        final_logit_softcapping=30.0,
        activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
        altup_num_inputs=2,
        altup_coef_clip=120.0,
        altup_correct_scale=True,
        altup_active_idx=0,
        laurel_rank=8,
    ),
    "gemma4": dict(
        sliding_window_pattern=2,
        num_hidden_layers=4,
        num_kv_shared_layers=2,
        vocab_size_per_layer_input=256,
        hidden_size_per_layer_input=8,
    ),
    "gemma4_text": dict(
        sliding_window_pattern=2,
        num_hidden_layers=4,
        num_kv_shared_layers=2,
        vocab_size_per_layer_input=256,
        hidden_size_per_layer_input=8,
    ),
    "glm4_moe": dict(rope_scaling=None),
    "glm_moe_dsa": dict(rope_parameters=dict(rope_theta=10000.0, rope_type="default")),
    "granitemoehybrid": dict(
        layer_types=["mamba", "attention"],
        mamba_n_heads=4,
        mamba_d_head=32,
        mamba_proj_bias=False,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_n_groups=1,
        mamba_conv_bias=True,
    ),
    "hunyuan": dict(rope_scaling=dict(alpha=1.0, factor=1.0, type="dynamic")),
    "jamba": dict(
        attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1, expert_layer_period=2
    ),
    "kimi_k3": dict(
        hidden_act="situ",  # the only activation its TextArgs accepts
        linear_attn_config=dict(kda_layers=[1], num_heads=4, head_dim=16, short_conv_kernel_size=4),
        num_experts_per_token=2,
        attn_res_block_size=1,
    ),
    "kimi_linear": dict(
        linear_attn_config=dict(kda_layers=[1], num_heads=4, head_dim=16, short_conv_kernel_size=4),
        model_max_length=512,
    ),
    "lfm2": dict(
        block_dim=64,
        block_multiple_of=32,
        block_ffn_dim_multiplier=1.0,
        block_auto_adjust_ff_dim=False,
        layer_types=["conv", "full_attention"],
    ),
    "lfm2-vl": dict(
        block_dim=64,
        block_multiple_of=32,
        block_ffn_dim_multiplier=1.0,
        block_auto_adjust_ff_dim=False,
        layer_types=["conv", "full_attention"],
    ),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "llama4": dict(attention_chunk_size=4, interleave_moe_layer_step=1, rope_scaling=None),
    "mamba2": dict(time_step_limit=(0.0, 100.0), num_heads=8, head_dim=16),
    "mellum": dict(layer_types=SW),
    "mimo_v2_flash": dict(hybrid_layer_pattern=[1, 0], moe_layer_freq=[0, 1]),
    "minicpm3": dict(rope_scaling=dict(original_max_position_embeddings=512)),
    "minimax": dict(shared_intermediate_size=32),
    "minimax_m3_vl": dict(  # text_config is a copy of these (config())
        moe_layer_freq=[0, 1],
        dense_intermediate_size=128,
        shared_intermediate_size=32,
        # layer 1 is block-sparse: its indexer keeps 2 blocks of 4 keys (+ the local one)
        sparse_attention_freq=[0, 1],
        index_block_size=4,
        index_topk_blocks=2,
        index_local_blocks=1,
    ),
    "ministral3": dict(
        rope_parameters=dict(
            rope_theta=10000.0, llama_4_scaling_beta=0.1, original_max_position_embeddings=512
        )
    ),
    "mistral4": dict(
        rope_parameters=dict(
            rope_theta=10000.0,
            llama_4_scaling_beta=0.1,
            original_max_position_embeddings=512,
            type="default",
        )
    ),
    "muse_spark": dict(
        num_shared_experts=0,  # its TextArgs refuses shared experts
        post_norm_eps=1e-5,
        rope_parameters=dict(rope_theta=10000.0),
        layer_rope_theta=[10000.0, 0.0],  # 0: the full-attention layer has no RoPE
        layer_types=SW,
        final_logit_softcapping=30.0,
        output_multiplier=1.0,
        moe_hidden_size=32,
    ),
    "nemotron-nas": dict(
        block_configs=[
            dict(attention=dict(n_heads_in_group=2), ffn=dict(ffn_mult=1.0)),
            dict(attention=dict(no_op=True), ffn=dict(ffn_mult=1.0)),
            # gets a KVCache from make_cache() that it never updates
            dict(attention=dict(replace_with_linear=True), ffn=dict(ffn_mult=1.0)),
        ],
        num_hidden_layers=3,
    ),
    "nemotron_h": dict(hybrid_override_pattern=["M", "*"], num_hidden_layers=2),
    "olmo3": dict(layer_types=SW),
    "openelm": dict(num_kv_heads=[1, 2], num_query_heads=[4, 4]),
    "plamo": dict(n_shared_head=2),
    "qwen": dict(intermediate_size=256),
    "qwen3_5": dict(full_attention_interval=2),
    "qwen3_5_moe": dict(full_attention_interval=2),
    "qwen3_next": dict(full_attention_interval=2),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "spark2_5": dict(
        layer_types=SW,
        rope_parameters=dict(
            sliding_attention=dict(rope_theta=10000.0), full_attention=dict(rope_theta=10000.0)
        ),
    ),
    "step3p5": dict(moe_num_experts=8, moe_top_k=2),
}
RP = dict(sliding_attention=dict(rope_theta=10000.0), full_attention=dict(rope_theta=10000.0))
OVERRIDES.update(
    {
        "mellum": dict(layer_types=SW, rope_parameters=RP),
        "spark2_5": dict(layer_types=SW, rope_parameters=RP, hidden_act="gelu_pytorch_tanh"),
        "nemotron-nas": dict(OVERRIDES["nemotron-nas"], hidden_act="silu"),
        "llama4": dict(OVERRIDES["llama4"], num_experts_per_tok=1),
        "qwen": dict(kv_channels=16),
        "granitemoehybrid": dict(OVERRIDES["granitemoehybrid"], shared_intermediate_size=32),
    }
)
OVERRIDES.update(
    {
        "spark2_5": dict(OVERRIDES["spark2_5"], hidden_act="gelu"),
        "llama4": dict(OVERRIDES["llama4"], num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0]),
    }
)


NOT_ARCHITECTURES = {
    "base",
    "cache",
    "activations",
    "bitlinear_layers",
    "gated_delta",
    "mla",
    "pipeline",
    "rope_utils",
    "ssm",
    "switch_layers",
}


def architectures() -> list[str]:
    """Every module of mlx_lm.models that defines a Model."""
    names = [m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__)]
    return sorted(n for n in names if n not in NOT_ARCHITECTURES)


def config(arch: str) -> dict:
    values = dict(SMALL, model_type=arch, **OVERRIDES.get(arch, {}))
    values.setdefault("text_config", dict(values))
    return values


def build(arch: str, seed: int = 0):
    """A tiny random-weight float32 model of `arch` (raises whatever mlx-lm raises)."""
    return random_model(config(arch), arch, seed)
