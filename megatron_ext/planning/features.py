"""Per-feature terms of the memory plan: the parameters each model feature adds, and the bytes its
layers keep for the backward pass (activations), per token.

Keyed by feature (dense attention, multi-latent attention, dense MLP, mixture of experts, MTP, the
embedding and output ends) so they can hang off the model-feature records when the model moves to
its ``models/`` package: each ``*_parameters`` / ``*_activations`` pair belongs with its feature.

Parameters use megatron-core's own names and full (unsharded) shapes, so that the parameter roles
come from the one grouping rule (``optimizers.common.param_groups.param_role``) and a test compares
them with the real model's ``named_parameters()``.

Activations are what autograd keeps between the forward and the backward pass of megatron-core
0.16.1's local layers (``--attention-backend sdpa``/``local``), measured tensor by tensor on this
machine and written here as formulas (docs/memory_plan.md lists them): per token, in bytes, for one
tensor-parallel rank without sequence parallelism (norms and the residual stream are whole on every
TP rank; what is inside attention and the MLP is split). ``p`` is the bytes of the model's dtype.
megatron-core's torch norms compute in fp32 and keep their input and normalised output in fp32
(8h bytes) whatever the model's dtype; Transformer Engine's fused norm-and-linear keeps its input
and normalised output in the model's dtype (2ph), which is what ``te`` assumes (not measurable here).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple
from megatron_ext.models.features.moe_mtp import moe_layer_pattern


@dataclasses.dataclass(frozen=True)
class ParamTensor:
    name: str  # megatron-core's parameter name
    shape: Tuple[int, ...]  # full (unsharded) shape
    tp_dim: Optional[int] = None  # the dimension tensor parallelism splits (None: replicated)
    layer: Optional[int] = None  # decoder layer (None: embedding, final norm, output layer, MTP)
    expert: bool = False  # a routed expert's weight (split over expert parallelism)
    place: str = "layer"  # embedding | layer | output | mtp: which pipeline stage holds it
    count: int = 1  # identical tensors it stands for (the routed experts of a layer: local_experts.0..E-1)

    @property
    def numel(self) -> int:
        """Elements of one of the tensors."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    def names(self) -> List[str]:
        if self.count == 1:
            return [self.name]
        return [self.name.replace(".local_experts.0.", f".local_experts.{e}.") for e in range(self.count)]


# The flags the parameters depend on (what makes two plans the same model).
MODEL_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_key_value_heads",
                "kv_channels", "swiglu", "normalization", "add_bias_linear", "position_embedding_type",
                "max_position_embeddings", "untie_embeddings_and_output_weights", "multi_latent_attention",
                "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "qk_layernorm",
                "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_layer_freq",
                "moe_first_k_dense", "mtp_num_layers")


# ---------------------------------------------------------------------------------------------
# Model shape helpers
# ---------------------------------------------------------------------------------------------

def head_dim(a) -> int:
    return getattr(a, "kv_channels", None) or a.hidden_size // a.num_attention_heads


def moe_pattern(a) -> List[int]:

    return moe_layer_pattern(a) or [0] * a.num_layers


def _norm(prefix: str, width: int, a, layer, place="layer") -> List[ParamTensor]:
    out = [ParamTensor(f"{prefix}.weight", (width,), None, layer, place=place)]
    if a.normalization == "LayerNorm":
        out.append(ParamTensor(f"{prefix}.bias", (width,), None, layer, place=place))
    return out


def _linear(prefix: str, rows: int, cols: int, tp_dim: int, a, layer, expert=False, place="layer",
            bias=True, count=1) -> List[ParamTensor]:
    out = [ParamTensor(f"{prefix}.weight", (rows, cols), tp_dim, layer, expert, place, count)]
    if bias and a.add_bias_linear:  # a row-parallel layer's bias is added after the reduce: replicated
        out.append(ParamTensor(f"{prefix}.bias", (rows,), 0 if tp_dim == 0 else None, layer, expert, place, count))
    return out


# ---------------------------------------------------------------------------------------------
# Parameters, per feature
# ---------------------------------------------------------------------------------------------

def attention_parameters(a, prefix: str, layer, place="layer") -> List[ParamTensor]:
    """Dense (multi-head / grouped-query) or multi-latent attention, with its norms."""
    h, heads = a.hidden_size, a.num_attention_heads
    out = _norm(f"{prefix}.input_layernorm", h, a, layer, place)
    sa = f"{prefix}.self_attention"
    if a.multi_latent_attention:
        qk = a.qk_head_dim + a.qk_pos_emb_head_dim
        out += _linear(f"{sa}.linear_proj", h, heads * a.v_head_dim, 1, a, layer, place=place)
        if a.q_lora_rank:
            out += _linear(f"{sa}.linear_q_down_proj", a.q_lora_rank, h, 0, a, layer, place=place)
            out += _linear(f"{sa}.linear_q_up_proj", heads * qk, a.q_lora_rank, 0, a, layer, place=place)
        else:
            out += _linear(f"{sa}.linear_q_proj", heads * qk, h, 0, a, layer, place=place)
        out += _linear(f"{sa}.linear_kv_down_proj", a.kv_lora_rank + a.qk_pos_emb_head_dim, h, 0, a, layer,
                       place=place)
        out += _linear(f"{sa}.linear_kv_up_proj", heads * (a.qk_head_dim + a.v_head_dim), a.kv_lora_rank, 0, a,
                       layer, place=place)
        if a.qk_layernorm:
            if a.q_lora_rank:
                out += _norm(f"{sa}.q_layernorm", a.q_lora_rank, a, layer, place)
            out += _norm(f"{sa}.kv_layernorm", a.kv_lora_rank, a, layer, place)
        return out
    d, groups = head_dim(a), a.num_key_value_heads
    out += _linear(f"{sa}.linear_proj", h, heads * d, 1, a, layer, place=place)
    out += _linear(f"{sa}.linear_qkv", (heads + 2 * groups) * d, h, 0, a, layer, place=place)
    if a.qk_layernorm:
        out += _norm(f"{sa}.q_layernorm", d, a, layer, place) + _norm(f"{sa}.k_layernorm", d, a, layer, place)
    return out


def _mlp(prefix: str, width: int, a, layer, expert=False, place="layer", count=1) -> List[ParamTensor]:
    fc1 = 2 * width if a.swiglu else width
    return (_linear(f"{prefix}.linear_fc1", fc1, a.hidden_size, 0, a, layer, expert, place, count=count)
            + _linear(f"{prefix}.linear_fc2", a.hidden_size, width, 1, a, layer, expert, place, count=count))


def mlp_parameters(a, prefix: str, layer, moe: bool, place="layer") -> List[ParamTensor]:
    """The pre-MLP norm and a dense MLP, or a mixture of experts: router, routed experts (split
    over expert parallelism), shared expert."""
    out = _norm(f"{prefix}.pre_mlp_layernorm", a.hidden_size, a, layer, place)
    if not moe:
        return out + _mlp(f"{prefix}.mlp", a.ffn_hidden_size, a, layer, place=place)
    out.append(ParamTensor(f"{prefix}.mlp.router.weight", (a.num_experts, a.hidden_size), None, layer, place=place))
    # the routed experts: one entry standing for local_experts.0 .. E-1 (identical shapes)
    out += _mlp(f"{prefix}.mlp.experts.local_experts.0", a.moe_ffn_hidden_size, a, layer, expert=True, place=place,
                count=a.num_experts)
    if a.moe_shared_expert_intermediate_size:
        out += _mlp(f"{prefix}.mlp.shared_experts", a.moe_shared_expert_intermediate_size, a, layer, place=place)
    return out


def embedding_parameters(a, vocab: int) -> List[ParamTensor]:
    out = [ParamTensor("embedding.word_embeddings.weight", (vocab, a.hidden_size), 0, place="embedding")]
    if a.position_embedding_type == "learned_absolute":
        out.append(ParamTensor("embedding.position_embeddings.weight", (a.max_position_embeddings, a.hidden_size),
                               place="embedding"))
    return out


def output_parameters(a, vocab: int) -> List[ParamTensor]:
    out = _norm("decoder.final_layernorm", a.hidden_size, a, None, "output")
    if a.untie_embeddings_and_output_weights:
        out.append(ParamTensor("output_layer.weight", (vocab, a.hidden_size), 0, place="output"))
    return out


def mtp_parameters(a) -> List[ParamTensor]:
    """Each MTP depth: two norms, the projection of [embedding; hidden] and one transformer layer
    of the last decoder layer's kind (the embedding and output layer are shared)."""
    out: List[ParamTensor] = []
    moe = bool(moe_pattern(a)[-1])
    for k in range(a.mtp_num_layers or 0):
        p = f"mtp.layers.{k}"
        out += _norm(f"{p}.enorm", a.hidden_size, a, None, "mtp") + _norm(f"{p}.hnorm", a.hidden_size, a, None, "mtp")
        out += _linear(f"{p}.eh_proj", a.hidden_size, 2 * a.hidden_size, 0, a, None, place="mtp", bias=False)
        out += attention_parameters(a, f"{p}.transformer_layer", None, "mtp")
        out += mlp_parameters(a, f"{p}.transformer_layer", None, moe, "mtp")
        out += _norm(f"{p}.final_layernorm", a.hidden_size, a, None, "mtp")
    return out


def parameters(a, vocab: int) -> List[ParamTensor]:
    """Every parameter of the model (full shapes), as megatron-core names them (the routed experts
    of a layer as one entry with ``count``: ``ParamTensor.names`` lists them)."""
    out = embedding_parameters(a, vocab)
    for i, moe in enumerate(moe_pattern(a)):
        prefix = f"decoder.layers.{i}"
        out += attention_parameters(a, prefix, i) + mlp_parameters(a, prefix, i, bool(moe))
    return out + output_parameters(a, vocab) + mtp_parameters(a)


# ---------------------------------------------------------------------------------------------
# Activations (bytes per token kept for backward), per feature
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kernels:
    """What the layers run, which decides what they keep."""

    backend: str  # sdpa | local | te
    score_matrix: bool  # the attention kernel materialises softmax(QK^T) (local; sdpa's math fallback)
    upcast_attention: bool  # sdpa's CPU math fallback keeps q, k, v in fp32 whatever the dtype
    dtype_bytes: int  # p
    tp: int
    micro_batch: int


def _norm_bytes(width: int, k: Kernels) -> float:
    # torch norm (sdpa/local): fp32 input and normalised output, fp32 1/rms; TE: both in p
    return (2 * k.dtype_bytes * width if k.backend == "te" else 8 * width) + 4


def _linear_input(width: int, k: Kernels) -> float:
    """The normalised input a column-parallel linear keeps (TE's fused norm already kept it)."""
    return 0 if k.backend == "te" else k.dtype_bytes * width


def attention_activations(a, k: Kernels, seq: int) -> List[Tuple[str, float]]:
    """(what, bytes per token) of one attention block: norm, projections, rotary, core attention."""
    p, t, heads = k.dtype_bytes, k.tp, a.num_attention_heads
    rows: List[Tuple[str, float]] = [("input norm", _norm_bytes(a.hidden_size, k))]
    if a.multi_latent_attention:
        qk, dv = a.qk_head_dim + a.qk_pos_emb_head_dim, a.v_head_dim
        rows.append(("q/kv down-projection input", _linear_input(a.hidden_size, k)))
        if a.q_lora_rank:
            rows.append(("q latent norm and up-projection input", 8 * a.q_lora_rank + 4 + p * a.q_lora_rank))
        rows.append(("kv latent norm and up-projection input", 8 * a.kv_lora_rank + 4 + p * a.kv_lora_rank))
        core = 4 if k.upcast_attention else p
        rows.append(("rotary tables", 4 * p * a.qk_pos_emb_head_dim / k.micro_batch))
        rows.append(("queries, keys (rotated), values", core * heads * (2 * qk + dv) / t))
        rows.append(("attention output", p * heads * dv / t))
        scores = 4 * heads * seq / t if k.score_matrix else 4 * heads / t
        rows.append(("attention probabilities" if k.score_matrix else "softmax statistics", scores))
        return rows
    d, groups = head_dim(a), a.num_key_value_heads
    q, kv = heads * d, groups * d
    rows.append(("QKV input", _linear_input(a.hidden_size, k)))
    # the values are a view of the fused QKV output, which they keep whole
    rows.append(("QKV output (held by the values)", p * (q + 2 * kv) / t))
    if a.position_embedding_type == "rope":
        rows.append(("rotated queries and keys", p * (q + kv) / t + 4 * p * d / k.micro_batch))
    if a.qk_layernorm:
        rows.append(("q/k norms", (8 * (q + kv) + 8 * (heads + groups)) / t))
    rows.append(("attention output", p * q / t))
    if k.score_matrix:
        # fp32 softmax (megatron-core's default attention_softmax_in_fp32) and its cast for the
        # product with the values
        rows.append(("attention probabilities", (4 + (p if p != 4 else 0)) * heads * seq / t))
    else:
        rows.append(("softmax statistics", 4 * heads / t))
    return rows


def mlp_activations(a, k: Kernels) -> List[Tuple[str, float]]:
    """The pre-MLP norm and a dense MLP: fc1's input, its output (2f with SwiGLU), the activation
    branch and fc2's input."""
    p, t, f = k.dtype_bytes, k.tp, a.ffn_hidden_size
    rows = [("pre-MLP norm", _norm_bytes(a.hidden_size, k)), ("fc1 input", _linear_input(a.hidden_size, k))]
    if a.swiglu:
        rows.append(("fc1 output, SwiGLU branches, fc2 input", 5 * p * f / t))
    else:
        rows.append(("fc1 output, GeLU output (fc2 input)", 2 * p * f / t))
    if a.hidden_dropout:
        rows.append(("dropout masks", 2 * a.hidden_size))
    return rows


def moe_activations(a, k: Kernels) -> List[Tuple[str, float]]:
    """A mixture of experts with the all-gather dispatcher: the router's input, the tokens permuted
    to their experts (top-k copies of each token: the dispatch buffer), per routed copy the expert's
    fc1 output, SwiGLU branches, the probability-weighted activation and fc2's input, and the shared
    expert as a dense MLP. Tokens per expert are taken as balanced (top-k copies per token)."""
    p, t, topk = k.dtype_bytes, k.tp, a.moe_router_topk
    fe = a.moe_ffn_hidden_size
    rows = [("pre-MLP norm", _norm_bytes(a.hidden_size, k)),
            ("router input and scores", _linear_input(a.hidden_size, k) + 4 * a.num_experts + 12 * topk)]
    rows.append(("dispatch buffer (tokens permuted to experts)", topk * p * a.hidden_size))
    per_copy = (6 if a.swiglu else 3) * p * fe / t
    rows.append(("routed experts (fc1 out, activation, weighted, fc2 in)", topk * per_copy))
    if a.moe_shared_expert_intermediate_size:
        rows.append(("shared expert", 5 * p * a.moe_shared_expert_intermediate_size / t))
    return rows


def layer_activations(a, k: Kernels, seq: int, moe: bool) -> List[Tuple[str, float]]:
    return attention_activations(a, k, seq) + (moe_activations(a, k) if moe else mlp_activations(a, k))


def output_activations(a, k: Kernels, vocab: int) -> List[Tuple[str, float]]:
    """The final norm, the output layer's input and the fp32 logits the cross entropy keeps (its
    softmax, computed in place), with the labels and loss mask."""
    return [("final norm", _norm_bytes(a.hidden_size, k)), ("output layer input", k.dtype_bytes * a.hidden_size),
            ("fp32 logits (softmax kept by the loss)", 4 * vocab / k.tp), ("labels and loss mask", 9)]


def mtp_activations(a, k: Kernels, seq: int, vocab: int) -> List[Tuple[str, float]]:
    """Each MTP depth: its two norms and projection input, one transformer layer, its own logits."""
    moe = bool(moe_pattern(a)[-1])
    per = (2 * _norm_bytes(a.hidden_size, k) + 2 * k.dtype_bytes * a.hidden_size
           + sum(b for _, b in layer_activations(a, k, seq, moe))
           + sum(b for _, b in output_activations(a, k, vocab)))
    return [("MTP depth(s)", (a.mtp_num_layers or 0) * per)]


def embedding_activations(a) -> List[Tuple[str, float]]:
    return [("token ids", 8)]
