"""Our model flags <-> a ``transformers`` config, and what one side cannot represent.

Export targets (``export_architecture``): ``LlamaForCausalLM`` (rotary, RMSNorm, SwiGLU; GQA,
biases, tied or untied, Llama 3 rope scaling), ``MixtralForCausalLM`` (the same with every layer a
softmax top-k MoE), ``DeepseekV3ForCausalLM`` (multi-latent attention with q/kv norms, first k
layers dense, then sigmoid-routed MoE with shared experts, expert bias and group-limited routing)
and ``GPT2LMHeadModel`` (learned positions, LayerNorm, exact GELU, no GQA).
muP/CompleteP multipliers need no config field: ``weight_mapping`` folds them into the weights.
Multi-token-prediction layers are a training aid with no Hugging Face field: they are left out
(the main next-token logits do not depend on them).

Import sources (``import_flags``): ``LlamaForCausalLM``, ``MistralForCausalLM`` and
``MixtralForCausalLM`` configs, as real checkpoints use them (GQA, tied embeddings, Llama 3.x
``llama3`` rope scaling); anything else is refused in one line naming the field.
"""
from __future__ import annotations

import math
import types
from typing import Dict, List, Optional, Tuple

from megatron_ext.hf import HFError
from megatron_ext.models import features
from megatron_ext.hf import require
from megatron_ext.models.features.mla import yarn_fixed_settings
from megatron_ext.models.features.moe_mtp import moe_layer_pattern
from megatron_ext.parametrizations import parametrization_for

LLAMA, MIXTRAL, GPT2, MISTRAL = "LlamaForCausalLM", "MixtralForCausalLM", "GPT2LMHeadModel", "MistralForCausalLM"
DEEPSEEK_V3 = "DeepseekV3ForCausalLM"
DEEPSEEK_V3_NORM_EPS = 1e-6  # transformers' DeepseekV3 builds its q/kv norms with the default eps
IMPORTABLE = (LLAMA, MISTRAL, MIXTRAL)

# megatron-core's Llama 3 rope scaling has these fixed (RotaryEmbedding._apply_scaling)
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _get(args, name, default=None):
    value = getattr(args, name, default)
    return default if value is None else value


def moe_pattern(args) -> Optional[List[int]]:

    return moe_layer_pattern(args) if _get(args, "num_experts") else None


def multipliers(args) -> Tuple[float, float, float]:
    """(logit multiplier, residual-branch multiplier, factor on q) of the saved parametrization."""

    if not getattr(args, "parametrization", None):
        return 1.0, 1.0, 1.0
    p = parametrization_for(args)
    scale = p.softmax_scale()
    head_dim = args.hidden_size // args.num_attention_heads
    return float(p.logit_multiplier()), float(p.residual_multiplier()), (
        1.0 if scale is None else float(scale) * math.sqrt(head_dim))


# -- export -----------------------------------------------------------------------------------
def export_architecture(args) -> str:
    """The Hugging Face class that computes what the saved flags describe; HFError (one line
    naming what is missing) when none does."""
    rope = _get(args, "position_embedding_type") == "rope"
    rms = str(_get(args, "normalization", "")).lower() == "rmsnorm"
    swiglu = bool(_get(args, "swiglu", False))
    heads, kv = args.num_attention_heads, _get(args, "num_key_value_heads", args.num_attention_heads)
    style = f"--model-style {_get(args, 'model_style', '?')}"
    problem = features.refusal("export_hf", args)  # what a model feature's record says export-hf cannot carry
    if problem:
        raise HFError(problem)
    if _deepseek_v3_style(args):
        _check_deepseek_v3(args, rope, rms, swiglu)
        if multipliers(args) != (1.0, 1.0, 1.0):
            raise HFError(f"--parametrization {args.parametrization}: its multipliers are not folded into "
                          f"{DEEPSEEK_V3} weights; export a model of the standard parametrization")
        return DEEPSEEK_V3
    if rope or rms or swiglu:
        missing = [what for ok, what in ((rope, "rotary positions (this model: learned absolute)"),
                                         (rms, f"RMSNorm (this model: {_get(args, 'normalization')})"),
                                         (swiglu, "SwiGLU (this model: GELU)")) if not ok]
        if missing:
            raise HFError(f"{style}: no Hugging Face class computes this model: LlamaForCausalLM needs "
                          + ", ".join(missing))
        if not _get(args, "num_experts"):
            return LLAMA
        pattern = moe_pattern(args)
        problems = []
        if not all(pattern):
            problems.append(f"an MoE MLP in every layer (this model has dense layers: {pattern})")
        if _get(args, "add_bias_linear", False):
            problems.append("no linear biases (this model has --add-bias-linear)")
        if _get(args, "moe_router_score_function", "softmax") != "softmax":
            problems.append(f"softmax router scores (this model: {args.moe_router_score_function})")
        if _get(args, "moe_router_pre_softmax", False):
            problems.append("top-k before the softmax (this model has --moe-router-pre-softmax)")
        if _get(args, "moe_router_topk_scaling_factor") is not None:
            problems.append("no top-k scaling factor (this model has --moe-router-topk-scaling-factor)")
        if problems:
            raise HFError(f"--num-experts {args.num_experts}: MixtralForCausalLM cannot represent this MoE model: "
                          f"it needs {'; '.join(problems)}")
        return MIXTRAL
    if _get(args, "num_experts"):
        raise HFError(f"{style} with --num-experts: no Hugging Face class has GPT-2 style MoE layers")
    if kv != heads:
        raise HFError(f"{style} with --num-key-value-heads {kv} (of {heads} heads): GPT2LMHeadModel has no "
                      "grouped-query attention")
    return GPT2


def _deepseek_v3_style(args) -> bool:
    moe = bool(_get(args, "num_experts"))
    return bool(_get(args, "multi_latent_attention", False)) or moe and any((
        _get(args, "moe_shared_expert_intermediate_size"), _get(args, "moe_router_num_groups"),
        _get(args, "moe_router_enable_expert_bias", False),
        _get(args, "moe_router_score_function", "softmax") == "sigmoid"))


def _check_deepseek_v3(args, rope: bool, rms: bool, swiglu: bool) -> None:
    """HFError naming everything DeepseekV3ForCausalLM cannot compute of this model."""
    problems = [what for ok, what in (
        (_get(args, "multi_latent_attention", False), "multi-latent attention (--multi-latent-attention)"),
        (_get(args, "qk_layernorm", False), "its q/kv norms (--qk-layernorm)"),
        (rope and rms and swiglu, "rotary positions, RMSNorm and SwiGLU"),
        (not _get(args, "add_bias_linear", False), "no linear biases"),
        (float(_get(args, "norm_epsilon", 1e-5)) == DEEPSEEK_V3_NORM_EPS,
         f"--norm-epsilon {DEEPSEEK_V3_NORM_EPS:g} (its q/kv norms fix it; this model: {_get(args, 'norm_epsilon')})"),
    ) if not ok]
    if _get(args, "num_experts"):
        m = _moe_routing(args)
        experts, groups, scored_by = m.experts, m.groups, m.topk // m.group_topk
        problems += [what for ok, what in (
            (_get(args, "moe_router_score_function", "softmax") == "sigmoid", "sigmoid router scores"),
            (not _get(args, "moe_router_pre_softmax", False), "no --moe-router-pre-softmax"),
            (all(m.pattern[m.first_moe:]), f"dense layers first, then MoE in every layer (this model: {m.pattern})"),
            (bool(m.shared) and m.shared % m.expert_ffn == 0,
             f"shared experts of a multiple of --moe-ffn-hidden-size {m.expert_ffn} (this model: {m.shared})"),
            (not _get(args, "moe_shared_expert_gate", False), "no shared-expert gate"),
            (experts % groups == 0 and experts // groups >= 2 and (groups == 1 or scored_by == 2),
             f"expert groups scored by their top 2 experts (this model: {groups} groups of {experts // groups}, "
             f"scored by their top {scored_by}; --moe-router-topk / --moe-router-group-topk must be 2)"),
        ) if not ok]
    if problems:
        raise HFError(f"DeepseekV3ForCausalLM cannot represent this model: it needs {'; '.join(problems)}")


def _moe_routing(args) -> types.SimpleNamespace:
    """The MoE layout and routing the saved flags give (what the DeepSeek-V3 check and config read)."""
    pattern = moe_pattern(args)
    return types.SimpleNamespace(
        experts=int(args.num_experts), topk=int(_get(args, "moe_router_topk", 2)), pattern=pattern,
        first_moe=pattern.index(1) if 1 in pattern else len(pattern),
        groups=int(_get(args, "moe_router_num_groups", 1)), group_topk=int(_get(args, "moe_router_group_topk", 1)),
        shared=_get(args, "moe_shared_expert_intermediate_size"),
        expert_ffn=_get(args, "moe_ffn_hidden_size", args.ffn_hidden_size))


def _rope_parameters(args) -> Dict:
    params = {"rope_type": "default", "rope_theta": float(int(args.rope_theta))}  # the model uses int(theta)
    if _get(args, "use_rope_scaling", False):
        params.update(rope_type="llama3", factor=float(_get(args, "rope_scaling_factor", 8.0)), **LLAMA3_ROPE_FIXED)
    return params


def hf_config(args, architecture: str, *, vocab_size: int, tie: bool, bos: Optional[int], eos: Optional[int],
              dtype: str):
    """The ``transformers`` config of ``architecture`` for the saved flags ``args``."""

    transformers = require("transformers")
    common = dict(vocab_size=vocab_size, tie_word_embeddings=tie, bos_token_id=bos, eos_token_id=eos,
                  architectures=[architecture], dtype=dtype)
    heads = args.num_attention_heads
    if architecture == DEEPSEEK_V3:
        return _deepseek_v3_config(transformers, args, common)
    if architecture == GPT2:
        return transformers.GPT2Config(
            n_positions=args.max_position_embeddings, n_embd=args.hidden_size, n_layer=args.num_layers,
            n_head=heads, n_inner=args.ffn_hidden_size, activation_function="gelu",
            layer_norm_epsilon=args.norm_epsilon, resid_pdrop=_get(args, "hidden_dropout", 0.0),
            embd_pdrop=_get(args, "hidden_dropout", 0.0), attn_pdrop=_get(args, "attention_dropout", 0.0),
            scale_attn_weights=True, **common)
    llama = dict(
        hidden_size=args.hidden_size, num_hidden_layers=args.num_layers, num_attention_heads=heads,
        num_key_value_heads=_get(args, "num_key_value_heads", heads), head_dim=args.hidden_size // heads,
        hidden_act="silu", max_position_embeddings=args.max_position_embeddings, rms_norm_eps=args.norm_epsilon,
        rope_parameters=_rope_parameters(args), attention_dropout=_get(args, "attention_dropout", 0.0), **common)
    if architecture == LLAMA:
        bias = bool(_get(args, "add_bias_linear", False))
        return transformers.LlamaConfig(intermediate_size=args.ffn_hidden_size, attention_bias=bias, mlp_bias=bias,
                                        **llama)
    return transformers.MixtralConfig(
        intermediate_size=_get(args, "moe_ffn_hidden_size", args.ffn_hidden_size),
        num_local_experts=args.num_experts, num_experts_per_tok=_get(args, "moe_router_topk", 2),
        router_aux_loss_coef=_get(args, "moe_aux_loss_coeff", 0.0), sliding_window=None, **llama)


def _deepseek_v3_config(transformers, args, common: Dict):
    heads, layers = args.num_attention_heads, args.num_layers
    moe = dict(n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1, moe_intermediate_size=args.ffn_hidden_size,
               n_group=1, topk_group=1, first_k_dense_replace=layers, routed_scaling_factor=1.0, norm_topk_prob=False)
    if _get(args, "num_experts"):
        m = _moe_routing(args)
        moe = dict(n_routed_experts=m.experts, num_experts_per_tok=m.topk, moe_intermediate_size=m.expert_ffn,
                   n_shared_experts=int(m.shared) // m.expert_ffn, n_group=m.groups, topk_group=m.group_topk,
                   first_k_dense_replace=m.first_moe, norm_topk_prob=m.topk > 1,  # megatron-core: sigmoid top-k > 1
                   routed_scaling_factor=float(_get(args, "moe_router_topk_scaling_factor", 1.0)))
    return transformers.DeepseekV3Config(
        hidden_size=args.hidden_size, intermediate_size=args.ffn_hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=_get(args, "q_lora_rank"),
        kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_head_dim, qk_rope_head_dim=args.qk_pos_emb_head_dim,
        v_head_dim=args.v_head_dim, rope_interleave=True,  # megatron-core's MLA rotates (even, odd) pairs
        hidden_act="silu", max_position_embeddings=args.max_position_embeddings, rms_norm_eps=args.norm_epsilon,
        rope_parameters=_mla_rope_parameters(args), attention_bias=False,
        attention_dropout=_get(args, "attention_dropout", 0.0), num_nextn_predict_layers=0, **moe, **common)


def _mla_rope_parameters(args) -> Dict:
    """MLA's rotary embedding: megatron-core's YaRN (its default) with factor 1 is plain RoPE;
    otherwise transformers' ``yarn`` with megatron-core's fixed settings (``mla.yarn_fixed_settings``)."""
    params = {"rope_type": "default", "rope_theta": float(int(args.rope_theta))}
    factor = float(_get(args, "rotary_scaling_factor", 1.0))
    if _get(args, "rope_type", "yarn") == "yarn" and factor != 1.0:

        params.update(rope_type="yarn", factor=factor, **yarn_fixed_settings(),
                      mscale=float(_get(args, "mscale", 1.0)), mscale_all_dim=float(_get(args, "mscale_all_dim", 0.0)))
    return params


def legacy_config_keys(config) -> Dict:
    """``rope_theta`` / ``rope_scaling`` as transformers 4.x and most serving tools still read them
    (transformers 5 writes only ``rope_parameters``)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        return {}
    extra = {"rope_theta": params.get("rope_theta")}
    if params.get("rope_type", "default") != "default":
        extra["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return extra


# -- import -----------------------------------------------------------------------------------
def _rope_of(config) -> Tuple[float, Optional[Dict]]:
    """(theta, rope scaling dict or None) of a transformers 5 config, or of a 4.x-style one."""
    params = getattr(config, "rope_parameters", None)
    if params:
        params = dict(params)
        theta = params.pop("rope_theta", getattr(config, "rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        return float(theta), (None if kind == "default" else params)
    scaling = getattr(config, "rope_scaling", None)
    return float(getattr(config, "rope_theta", 10000.0)), (dict(scaling) if scaling else None)


def import_flags(config, where: str) -> Tuple[List[str], str]:
    """(trainer flags describing the model, architecture) for a ``transformers`` config; HFError
    (one line naming the field) for what our model cannot compute."""
    architectures = list(getattr(config, "architectures", None) or [])
    arch = architectures[0] if architectures else {"llama": LLAMA, "mistral": MISTRAL, "mixtral": MIXTRAL}.get(
        getattr(config, "model_type", ""), getattr(config, "model_type", "?"))
    if arch not in IMPORTABLE:
        raise HFError(f"{where}: architecture {arch} is not supported; import-hf reads {', '.join(IMPORTABLE)}")

    def refuse(field, value, why):
        raise HFError(f"{where}: {field}={value!r} is not supported ({why})")

    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        refuse("hidden_act", act, "the SwiGLU MLP uses silu")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        refuse("head_dim", head_dim, f"the model needs head_dim = hidden_size / num_attention_heads = {hidden // heads}")
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        refuse("sliding_window", window, "attention over the whole sequence only")
    bias_attn = bool(getattr(config, "attention_bias", False))
    bias_mlp = bool(getattr(config, "mlp_bias", False))
    if bias_attn != bias_mlp:
        refuse("attention_bias/mlp_bias", (bias_attn, bias_mlp), "--add-bias-linear puts biases on every linear layer")
    theta, scaling = _rope_of(config)
    if not float(theta).is_integer():
        refuse("rope_theta", theta, "the rotary base is an integer in megatron-core")
    flags = ["--model-style", "llama",
             "--num-layers", str(config.num_hidden_layers), "--hidden-size", str(hidden),
             "--ffn-hidden-size", str(config.intermediate_size), "--num-attention-heads", str(heads),
             "--num-key-value-heads", str(kv), "--max-position-embeddings", str(config.max_position_embeddings),
             "--norm-epsilon", repr(float(config.rms_norm_eps)), "--rope-theta", str(int(theta)),
             "--attention-dropout", "0", "--hidden-dropout", "0"]
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            refuse("rope_scaling", kind, "only Llama 3.x 'llama3' rope scaling is implemented (--use-rope-scaling)")
        for key, value in LLAMA3_ROPE_FIXED.items():
            if key in scaling and float(scaling[key]) != value:
                refuse(f"rope_scaling.{key}", scaling[key], f"megatron-core's Llama 3 scaling fixes it to {value:g}")
        flags += ["--use-rope-scaling", "--rope-scaling-factor", repr(float(scaling["factor"]))]
    flags += ["--tie-embeddings-and-output-weights" if getattr(config, "tie_word_embeddings", False)
              else "--untie-embeddings-and-output-weights"]
    if bias_attn:
        flags += ["--add-bias-linear"]
    if arch == MIXTRAL:
        experts, topk = config.num_local_experts, config.num_experts_per_tok
        flags += ["--num-experts", str(experts), "--moe-router-topk", str(topk),
                  "--moe-ffn-hidden-size", str(config.intermediate_size)]
        if topk == 1:  # Mixtral renormalises its top-k weights: with one expert the weight is 1
            refuse("num_experts_per_tok", 1, "top-1 softmax routing needs --moe-router-pre-softmax, which weights "
                                             "the expert by its probability where Mixtral uses 1")
    return flags, arch


def seq_length_for(max_positions: int) -> int:
    """A training sequence length for an imported model: its context, at most 4096 (a starting
    point to change with SEQ / --seq-length)."""
    return int(min(max_positions, 4096))
