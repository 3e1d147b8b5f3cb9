"""DeepSeek-V2/V3 attention: multi-latent attention (MLA) with its RoPE variant, and qk-layernorm.
The flags (Megatron-LM's names), their checks, and what they set in megatron-core's config.

MLA (megatron-core ``MLASelfAttention``) compresses keys and values into one latent of
``--kv-lora-rank`` per token (and queries into ``--q-lora-rank``, when given), then projects them
back up per head; the positional part of each head (``--qk-pos-emb-head-dim``) is rotated
separately and shared by all heads' keys. The core attention is megatron-core's local one (the
layer spec is ``models.specs.base_layer_specs``). See docs/deepseek_v3.md.
"""
from __future__ import annotations

import functools
from typing import List, Tuple

from megatron_ext.argtypes import choice_ci, finite_float, positive_float, positive_int
from megatron_ext.models.feature import Feature, Support, saved_value
from megatron_ext.models.specs import with_core_attention

# Megatron-LM's defaults, filled with --multi-latent-attention (all None without it).
MLA_DEFAULTS = {"kv_lora_rank": 32, "qk_head_dim": 128, "qk_pos_emb_head_dim": 64, "v_head_dim": 128,
                "rope_type": "yarn", "rotary_scaling_factor": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}
# Flags that mean nothing without --multi-latent-attention (q_lora_rank has no default: None = a full q projection).
MLA_ONLY = ("q_lora_rank", *MLA_DEFAULTS)
YARN_ONLY = ("rotary_scaling_factor", "mscale", "mscale_all_dim")


def add_mla_arguments(g) -> None:
    g.add_argument("--multi-latent-attention", action="store_true",
                   help="DeepSeek-V2/V3 multi-latent attention (MLA): keys and values through one low-rank latent")
    g.add_argument("--q-lora-rank", type=positive_int, default=None,
                   help="MLA: rank of the query's low-rank projection (default: none, a full query projection)")
    g.add_argument("--kv-lora-rank", type=positive_int, default=None,
                   help="MLA: rank of the shared key/value latent (default 32)")
    g.add_argument("--qk-head-dim", type=positive_int, default=None,
                   help="MLA: per-head query/key dimension without position (default 128)")
    g.add_argument("--qk-pos-emb-head-dim", type=positive_int, default=None,
                   help="MLA: per-head query/key dimension that carries RoPE (default 64)")
    g.add_argument("--v-head-dim", type=positive_int, default=None, help="MLA: per-head value dimension (default 128)")
    g.add_argument("--rope-type", type=choice_ci("rope", "yarn"), default=None,
                   help="MLA's RoPE: yarn (default, as in Megatron-LM; with --rotary-scaling-factor 1 it equals "
                        "rope) or rope")
    g.add_argument("--rotary-scaling-factor", type=positive_float, default=None,
                   help="MLA yarn: context-extension factor (default 1.0: no extension)")
    g.add_argument("--mscale", type=finite_float, default=None, help="MLA yarn: mscale (default 1.0)")
    g.add_argument("--mscale-all-dim", type=finite_float, default=None, help="MLA yarn: mscale_all_dim (default 0.0)")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="normalise queries and keys per head before attention (with MLA: the query and key/value "
                        "latents), with the model's --normalization")


def validate_attention_args(a) -> None:
    """Fill the MLA defaults and reject what cannot work: ValueError, one line naming the flag."""
    if not a.multi_latent_attention:
        given = [d for d in MLA_ONLY if getattr(a, d) is not None
                 and not (d == "rope_type" and a.rope_type == "rope" and a.position_embedding_type == "rope")]
        if given:  # (--rope-type rope is what rotary attention does anyway)
            raise ValueError(f"--{given[0].replace('_', '-')} needs --multi-latent-attention")
        return
    for dest, default in MLA_DEFAULTS.items():
        if getattr(a, dest) is None:
            setattr(a, dest, default)
    if a.rope_type != "yarn":
        given = [d for d in YARN_ONLY if getattr(a, d) != MLA_DEFAULTS[d]]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is a yarn setting: it needs --rope-type yarn")
    if a.num_key_value_heads != a.num_attention_heads:
        raise ValueError(f"--num-key-value-heads {a.num_key_value_heads} with --multi-latent-attention: MLA has no "
                         f"grouped-query attention (every head's keys and values come from one shared latent); "
                         f"use {a.num_attention_heads} or leave it unset")
    tp = a.tensor_model_parallel_size
    down = a.kv_lora_rank + a.qk_pos_emb_head_dim
    if down % tp:
        raise ValueError(f"--tensor-model-parallel-size {tp} does not divide --kv-lora-rank + --qk-pos-emb-head-dim "
                         f"= {down} (MLA's key/value down-projection is split across tensor-parallel ranks)")
    if a.q_lora_rank is not None and a.q_lora_rank % tp:
        raise ValueError(f"--tensor-model-parallel-size {tp} does not divide --q-lora-rank {a.q_lora_rank}")


def config_class(args):
    """megatron-core's config class for MLA (None without it: the plain one)."""
    if not args.multi_latent_attention:
        return None
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return MLATransformerConfig


def yarn_fixed_settings() -> dict:
    """What megatron-core fixes of MLA's YaRN (MLATransformerConfig's defaults; no flag sets them)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig as fixed

    return {"original_max_position_embeddings": fixed.original_max_position_embeddings,
            "beta_fast": float(fixed.beta_fast), "beta_slow": float(fixed.beta_slow)}


def config_kwargs(args) -> dict:
    """The TransformerConfig fields the attention flags set."""
    kwargs = {"qk_layernorm": args.qk_layernorm}
    if args.multi_latent_attention:
        kwargs.update(
            multi_latent_attention=True,
            q_lora_rank=args.q_lora_rank,
            kv_lora_rank=args.kv_lora_rank,
            qk_head_dim=args.qk_head_dim,
            qk_pos_emb_head_dim=args.qk_pos_emb_head_dim,
            v_head_dim=args.v_head_dim,
            rope_type=args.rope_type,
            rotary_base=args.rope_theta,
            # Given explicitly: MLATransformerConfig's own default factor (40) is DeepSeek-V3's long context.
            rotary_scaling_factor=args.rotary_scaling_factor,
            mscale=args.mscale,
            mscale_all_dim=args.mscale_all_dim,
            # The local core attention's output width is heads x kv_channels: MLA's values are v_head_dim wide.
            kv_channels=args.v_head_dim,
        )
    return kwargs


@functools.lru_cache(maxsize=None)
def local_mla_core_attention():
    """megatron-core 0.16.1's local ``DotProductAttention`` for MLA. MLA builds its core attention
    with ``k_channels``/``v_channels`` (its query-key and value head widths), which only Transformer
    Engine's class accepts, so the local spec fails to build. The local computation needs neither:
    scores are query . key at any head width with MLA's explicit softmax scale, and the output is
    heads x kv_channels wide, which ``config_kwargs`` sets to --v-head-dim. This subclass only takes
    (and checks) the two arguments; it computes nothing of its own."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class LocalMLACoreAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None and v_channels != self.hidden_size_per_attention_head:
                raise ValueError(f"MLA value head width {v_channels} != kv_channels "
                                 f"{self.hidden_size_per_attention_head}")

    return LocalMLACoreAttention


def layer_specs(specs, config, args):
    """MLA layers whose core attention is still megatron-core's local one (``--attention-backend
    local``; the backend's rewrite runs first, so sdpa has replaced it) get ``local_mla_core_attention``."""
    if not config.multi_latent_attention:
        return specs
    return tuple(with_core_attention(spec, local_mla_core_attention()) for spec in specs)


def attention_widths(args) -> Tuple[int, int]:
    """(query-key width, value width) of one layer's attention, summed over heads: what the attention
    scores and the weighted sum of values cost per token and per key (FLOPs)."""
    if args.multi_latent_attention:
        heads = args.num_attention_heads
        return heads * (args.qk_head_dim + args.qk_pos_emb_head_dim), heads * args.v_head_dim
    return args.hidden_size, args.hidden_size


def summary(args) -> str:
    """One line for the start-up table ('' for plain attention)."""
    parts = []
    if args.multi_latent_attention:
        q = f"q rank {args.q_lora_rank}" if args.q_lora_rank else "full q"
        rope = args.rope_type + (f" x{args.rotary_scaling_factor:g}" if args.rope_type == "yarn" else "")
        parts.append(f"MLA kv rank {args.kv_lora_rank}, {q}, head dims qk {args.qk_head_dim}+{args.qk_pos_emb_head_dim} "
                     f"v {args.v_head_dim}, {rope}")
    if args.qk_layernorm:
        parts.append("qk-layernorm")
    return "; ".join(parts)


def _qk_layernorm_alone(saved) -> List[str]:
    both = saved_value(saved, "qk_layernorm", False) and not saved_value(saved, "multi_latent_attention", False)
    return ["--qk-layernorm without --multi-latent-attention"] if both else []


def _in_use(saved) -> List[str]:
    return [flag for flag, key in (("--multi-latent-attention", "multi_latent_attention"),
                                   ("--qk-layernorm", "qk_layernorm")) if saved_value(saved, key, False)]


FEATURE = Feature(
    name="multi-latent attention", title="multi-latent attention and qk-layernorm", add_arguments=add_mla_arguments,
    validate=validate_attention_args, config_kwargs=config_kwargs, config_class=config_class,
    layer_specs=layer_specs,  # after the attention backend's (models/features/__init__.py)
    summary=summary, row="attention",  # the attention row, after the backend's line
    # MLA is exported as DeepseekV3ForCausalLM (hf/config_mapping.py checks the rest of the model)
    export_hf=Support(_qk_layernorm_alone, "no Hugging Face class this export writes computes it"),
    convert=Support(_in_use, "no Megatron-DeepSpeed counterpart here (the fork's GPT layers have no multi-latent "
                            "attention or qk-layernorm)"),
)
