"""megatron-core GPT tensors <-> Hugging Face tensors (whole tensors, vocabulary unpadded).

* Fused QKV: megatron-core stores, for each query group g, ``[q heads of g; k_g; v_g]`` (rows);
  Hugging Face keeps ``q_proj`` (query heads group-major, so query head i uses key/value head
  i // heads-per-group, as ``repeat_kv`` expects), ``k_proj`` and ``v_proj``. Both sides apply
  rotary embeddings to the two halves of each head (``rotate_half``), so no permutation is needed.
* SwiGLU: ``linear_fc1`` is ``[gate; up]`` -> ``gate_proj``, ``up_proj`` (Mixtral: ``w1``, ``w3``).
* MoE: ``router`` -> ``block_sparse_moe.gate``, ``experts.local_experts.e`` -> ``experts.e.w1/w2/w3``
  (the hub's Mixtral layout, which every ``transformers`` version reads).
* DeepSeek-V3 (multi-latent attention): ``linear_q_down_proj``/``q_layernorm``/``linear_q_up_proj`` ->
  ``q_a_proj``/``q_a_layernorm``/``q_b_proj`` (or ``linear_q_proj`` -> ``q_proj``),
  ``linear_kv_down_proj``/``kv_layernorm``/``linear_kv_up_proj`` -> ``kv_a_proj_with_mqa``/
  ``kv_a_layernorm``/``kv_b_proj``: the same row layouts (per head [no-position part; rotary part],
  [latent; rotary key], per head [key; value]), so plain renames; the rotary pairs are (even, odd)
  on both sides (``rope_interleave``). Router -> ``mlp.gate`` with its ``expert_bias`` as
  ``e_score_correction_bias``; routed experts in the hub layout (``mlp.experts.e.gate_proj/up_proj/
  down_proj``), shared experts -> ``mlp.shared_experts``.
* Parametrization multipliers (muP / CompleteP) are forward hooks in our model; exported, they are
  folded into the weights so the Hugging Face model computes the same function: a residual-branch
  multiplier r into each branch's last matrix and bias (``o_proj``, ``down_proj``, every expert's
  ``w2``), the attention scale s (instead of 1/sqrt(head_dim)) into ``q_proj`` as s*sqrt(head_dim)
  (rotary embeddings are linear in q), the logit multiplier into ``lm_head`` (tied embeddings then
  become an untied copy, since scaling the shared matrix would also scale the inputs).

Import is the exact inverse without multipliers (imported models use ``--parametrization sp``), so
import then export gives the same bits.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from megatron_ext.hf import HFError
from megatron_ext.hf.config_mapping import DEEPSEEK_V3, GPT2, MIXTRAL, moe_pattern, multipliers


def split_qkv(w: torch.Tensor, groups: int, per_group: int, head_dim: int):
    rest = w.shape[1:]
    w = w.reshape(groups, (per_group + 2) * head_dim, *rest)
    q = w[:, : per_group * head_dim].reshape(groups * per_group * head_dim, *rest)
    k = w[:, per_group * head_dim:(per_group + 1) * head_dim].reshape(groups * head_dim, *rest)
    v = w[:, (per_group + 1) * head_dim:].reshape(groups * head_dim, *rest)
    return q, k, v


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, per_group: int, head_dim: int):
    rest = q.shape[1:]
    return torch.cat([q.reshape(groups, per_group * head_dim, *rest), k.reshape(groups, head_dim, *rest),
                      v.reshape(groups, head_dim, *rest)], dim=1).reshape(-1, *rest)


def _attention_shape(args) -> Tuple[int, int, int]:
    heads = args.num_attention_heads
    groups = getattr(args, "num_key_value_heads", None) or heads
    return groups, heads // groups, args.hidden_size // heads


# -- export -----------------------------------------------------------------------------------
def to_hf(state: Dict[str, torch.Tensor], args, architecture: str) -> Tuple[Dict[str, torch.Tensor], bool, List[str]]:
    """(Hugging Face state dict, tie_word_embeddings, notes) for whole megatron-core tensors."""
    logit, residual, q_factor = multipliers(args)
    notes = []
    if (logit, residual, q_factor) != (1.0, 1.0, 1.0):
        notes.append(f"parametrization {args.parametrization}: logits x{logit:.6g}, residual branches x{residual:.6g}, "
                     f"attention scores x{q_factor:.6g} folded into the weights")
    mtp = [n for n in state if n.startswith("mtp.")]
    if mtp:
        notes.append(f"{len({n.split('.')[2] for n in mtp})} multi-token-prediction layer(s) left out "
                     "(a training aid; the next-token logits do not use them)")
    used = set(mtp)

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise HFError(f"the checkpoint has no {name}, which its saved flags imply")
        used.add(name)
        return state[name].float()

    def opt(name: str):
        return take(name) if name in state else None

    out: Dict[str, torch.Tensor] = {}
    to = {GPT2: _to_gpt2, DEEPSEEK_V3: _to_deepseek_v3}.get(architecture, _to_llama)
    to(take, opt, args, architecture, residual, q_factor, out)
    tie = not getattr(args, "untie_embeddings_and_output_weights", False)
    embed_name = "transformer.wte.weight" if architecture == GPT2 else "model.embed_tokens.weight"
    if not tie:
        out["lm_head.weight"] = take("output_layer.weight") * logit
    elif logit != 1.0:
        out["lm_head.weight"] = out[embed_name] * logit
        tie = False
        notes.append("tied embeddings exported untied: the logit multiplier scales only the output copy")
    leftover = sorted(set(state) - used)
    if leftover:
        raise HFError(f"the checkpoint has {leftover[0]}, which the {architecture} mapping does not use")
    return {k: v.contiguous() for k, v in out.items()}, tie, notes


def _to_llama(take: Callable, opt: Callable, args, architecture, residual, q_factor, out) -> None:
    groups, per_group, head_dim = _attention_shape(args)
    out["model.embed_tokens.weight"] = take("embedding.word_embeddings.weight")
    for i in range(args.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "post_attention_layernorm.weight"] = take(src + "pre_mlp_layernorm.weight")
        attn = dst + "self_attn."
        for kind in ("weight", "bias"):
            qkv = opt(src + f"self_attention.linear_qkv.{kind}")
            if qkv is None:
                continue
            q, k, v = split_qkv(qkv, groups, per_group, head_dim)
            out[attn + f"q_proj.{kind}"], out[attn + f"k_proj.{kind}"], out[attn + f"v_proj.{kind}"] = q * q_factor, k, v
            out[attn + f"o_proj.{kind}"] = take(src + f"self_attention.linear_proj.{kind}") * residual
        if architecture == MIXTRAL:
            moe = dst + "block_sparse_moe."
            out[moe + "gate.weight"] = take(src + "mlp.router.weight")
            for e in range(args.num_experts):
                expert = src + f"mlp.experts.local_experts.{e}."
                gate, up = take(expert + "linear_fc1.weight").chunk(2, dim=0)
                out[moe + f"experts.{e}.w1.weight"], out[moe + f"experts.{e}.w3.weight"] = gate, up
                out[moe + f"experts.{e}.w2.weight"] = take(expert + "linear_fc2.weight") * residual
        else:
            for kind in ("weight", "bias"):
                fc1 = opt(src + f"mlp.linear_fc1.{kind}")
                if fc1 is None:
                    continue
                out[dst + f"mlp.gate_proj.{kind}"], out[dst + f"mlp.up_proj.{kind}"] = fc1.chunk(2, dim=0)
                out[dst + f"mlp.down_proj.{kind}"] = take(src + f"mlp.linear_fc2.{kind}") * residual
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")


def _to_deepseek_v3(take: Callable, opt: Callable, args, architecture, residual, q_factor, out) -> None:
    pattern = moe_pattern(args) or [0] * args.num_layers
    out["model.embed_tokens.weight"] = take("embedding.word_embeddings.weight")
    for i in range(args.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "post_attention_layernorm.weight"] = take(src + "pre_mlp_layernorm.weight")
        ours, theirs = src + "self_attention.", dst + "self_attn."
        renames = [("linear_kv_down_proj", "kv_a_proj_with_mqa"), ("kv_layernorm", "kv_a_layernorm"),
                   ("linear_kv_up_proj", "kv_b_proj"), ("linear_proj", "o_proj")]
        renames += ([("linear_q_down_proj", "q_a_proj"), ("q_layernorm", "q_a_layernorm"),
                     ("linear_q_up_proj", "q_b_proj")] if getattr(args, "q_lora_rank", None) else
                    [("linear_q_proj", "q_proj")])
        for a, b in renames:
            out[theirs + b + ".weight"] = take(ours + a + ".weight")
        if pattern[i]:
            moe, mlp = src + "mlp.", dst + "mlp."
            out[mlp + "gate.weight"] = take(moe + "router.weight")
            bias = opt(moe + "router.expert_bias")
            out[mlp + "gate.e_score_correction_bias"] = torch.zeros(args.num_experts) if bias is None else bias
            for e in range(args.num_experts):
                _swiglu_to_hf(take, moe + f"experts.local_experts.{e}.", mlp + f"experts.{e}.", out)
            _swiglu_to_hf(take, moe + "shared_experts.", mlp + "shared_experts.", out)
        else:
            _swiglu_to_hf(take, src + "mlp.", dst + "mlp.", out)
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")


def _swiglu_to_hf(take: Callable, ours: str, theirs: str, out) -> None:
    out[theirs + "gate_proj.weight"], out[theirs + "up_proj.weight"] = take(ours + "linear_fc1.weight").chunk(2, dim=0)
    out[theirs + "down_proj.weight"] = take(ours + "linear_fc2.weight")


def _to_gpt2(take: Callable, opt: Callable, args, architecture, residual, q_factor, out) -> None:
    groups, per_group, head_dim = _attention_shape(args)
    hidden = args.hidden_size
    out["transformer.wte.weight"] = take("embedding.word_embeddings.weight")
    out["transformer.wpe.weight"] = take("embedding.position_embeddings.weight")

    def bias_or_zeros(name: str, size: int) -> torch.Tensor:  # GPT-2 always has biases: zeros compute the same
        b = opt(name)
        return torch.zeros(size) if b is None else b

    for i in range(args.num_layers):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            out[dst + f"{theirs}.weight"] = take(src + f"{ours}.weight")
            out[dst + f"{theirs}.bias"] = take(src + f"{ours}.bias")
        q, k, v = split_qkv(take(src + "self_attention.linear_qkv.weight"), groups, per_group, head_dim)
        qb, kb, vb = split_qkv(bias_or_zeros(src + "self_attention.linear_qkv.bias", 3 * hidden), groups, per_group,
                               head_dim)
        out[dst + "attn.c_attn.weight"] = torch.cat([q * q_factor, k, v], dim=0).t()  # Conv1D: [in, out]
        out[dst + "attn.c_attn.bias"] = torch.cat([qb * q_factor, kb, vb])
        out[dst + "attn.c_proj.weight"] = (take(src + "self_attention.linear_proj.weight") * residual).t()
        out[dst + "attn.c_proj.bias"] = bias_or_zeros(src + "self_attention.linear_proj.bias", hidden) * residual
        out[dst + "mlp.c_fc.weight"] = take(src + "mlp.linear_fc1.weight").t()
        out[dst + "mlp.c_fc.bias"] = bias_or_zeros(src + "mlp.linear_fc1.bias", args.ffn_hidden_size)
        out[dst + "mlp.c_proj.weight"] = (take(src + "mlp.linear_fc2.weight") * residual).t()
        out[dst + "mlp.c_proj.bias"] = bias_or_zeros(src + "mlp.linear_fc2.bias", hidden) * residual
    out["transformer.ln_f.weight"] = take("decoder.final_layernorm.weight")
    out["transformer.ln_f.bias"] = take("decoder.final_layernorm.bias")


# -- import -----------------------------------------------------------------------------------
def from_hf(get: Callable[[str], torch.Tensor], names: List[str], config, architecture: str) -> Dict[str, torch.Tensor]:
    """Whole megatron-core tensors (vocabulary unpadded) of a Llama / Mistral / Mixtral model whose
    tensors ``get(name)`` returns; ``names`` are all the names it holds."""
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    per_group, head_dim = heads // groups, config.hidden_size // heads
    have = set(names)
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in have:
            raise HFError(f"the Hugging Face weights have no {name}")
        used.add(name)
        return get(name)

    out = {"embedding.word_embeddings.weight": take("model.embed_tokens.weight")}
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "pre_mlp_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
        attn = src + "self_attn."
        for kind in ("weight", "bias"):
            if attn + f"q_proj.{kind}" not in have:
                continue
            out[dst + f"self_attention.linear_qkv.{kind}"] = join_qkv(
                take(attn + f"q_proj.{kind}"), take(attn + f"k_proj.{kind}"), take(attn + f"v_proj.{kind}"),
                groups, per_group, head_dim)
            out[dst + f"self_attention.linear_proj.{kind}"] = take(attn + f"o_proj.{kind}")
        if architecture == MIXTRAL:
            _experts_from_hf(take, have, src, dst, config.num_local_experts, out)
        else:
            for kind in ("weight", "bias"):
                if src + f"mlp.gate_proj.{kind}" in have:
                    out[dst + f"mlp.linear_fc1.{kind}"] = torch.cat(
                        [take(src + f"mlp.gate_proj.{kind}"), take(src + f"mlp.up_proj.{kind}")], dim=0)
                    out[dst + f"mlp.linear_fc2.{kind}"] = take(src + f"mlp.down_proj.{kind}")
    out["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if not getattr(config, "tie_word_embeddings", False):
        out["output_layer.weight"] = take("lm_head.weight")
    elif "lm_head.weight" in have:
        used.add("lm_head.weight")  # a tied copy some checkpoints store anyway
    leftover = sorted(n for n in have - used if not n.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise HFError(f"the Hugging Face weights have {leftover[0]}, which the {architecture} mapping does not use")
    return out


def _experts_from_hf(take, have, src: str, dst: str, experts: int, out) -> None:
    """Mixtral experts in the hub layout (``block_sparse_moe.experts.e.w1/w2/w3``) or in
    transformers 5's fused one (``mlp.experts.gate_up_proj`` / ``down_proj``)."""
    if src + "block_sparse_moe.gate.weight" in have:
        moe = src + "block_sparse_moe."
        out[dst + "mlp.router.weight"] = take(moe + "gate.weight")
        for e in range(experts):
            expert = dst + f"mlp.experts.local_experts.{e}."
            out[expert + "linear_fc1.weight"] = torch.cat(
                [take(moe + f"experts.{e}.w1.weight"), take(moe + f"experts.{e}.w3.weight")], dim=0)
            out[expert + "linear_fc2.weight"] = take(moe + f"experts.{e}.w2.weight")
        return
    out[dst + "mlp.router.weight"] = take(src + "mlp.gate.weight")
    gate_up, down = take(src + "mlp.experts.gate_up_proj"), take(src + "mlp.experts.down_proj")
    for e in range(experts):
        out[dst + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e]  # [gate; up] rows
        out[dst + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e]
