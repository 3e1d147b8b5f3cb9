"""megatron-core GPT tensors <-> Hugging Face tensors (whole tensors, vocabulary unpadded): one
table (``MAPPINGS``: per architecture, each of our tensors, the Hugging Face tensor(s) holding it and
the layout between them) that export (``to_hf``) and import (``from_hf``) read in opposite directions.

* Fused QKV: megatron-core stores, for each query group g, ``[q heads of g; k_g; v_g]`` (rows);
  Hugging Face keeps ``q_proj`` (query heads group-major, so query head i uses key/value head
  i // heads-per-group, as ``repeat_kv`` expects), ``k_proj`` and ``v_proj``. Both sides apply
  rotary embeddings to the two halves of each head (``rotate_half``), so no permutation is needed.
* SwiGLU: ``linear_fc1`` is ``[gate; up]`` -> ``gate_proj``, ``up_proj`` (Mixtral: ``w1``, ``w3``).
* MoE: ``router`` -> ``block_sparse_moe.gate``, ``experts.local_experts.e`` -> ``experts.e.w1/w2/w3``
  (the hub's Mixtral layout, which every ``transformers`` version reads; import also reads
  transformers 5's fused ``mlp.experts.gate_up_proj`` / ``down_proj``).
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

import dataclasses
from typing import Callable, Dict, Iterator, List, Sequence, Tuple, Union

import torch

from megatron_ext.hf import HFError
from megatron_ext.hf.config_mapping import DEEPSEEK_V3, GPT2, LLAMA, MIXTRAL, moe_pattern, multipliers

# How one megatron-core tensor is laid out over its Hugging Face tensor(s) (``_to_theirs`` / ``_to_ours``).
SAME = "same"  # one tensor, the same values
QKV = "qkv"  # fused QKV <-> q, k, v
QKV_CAT = "qkv_cat"  # fused QKV (per group) <-> one [q; k; v] tensor (GPT-2's c_attn)
GATE_UP = "gate_up"  # SwiGLU's [gate; up] <-> gate, up
STACKED = "stacked"  # expert e's tensor <-> row e of one tensor of every expert (``{e}`` only in ours)


@dataclasses.dataclass(frozen=True)
class Row:
    """One megatron-core tensor and the Hugging Face tensor(s) holding it, under the block's prefixes."""

    ours: str
    theirs: Tuple[str, ...]
    layout: str = SAME
    conv1d: bool = False  # theirs is GPT-2's Conv1D weight: [in, out], the transpose of ours
    scale: str = ""  # export folds this multiplier of the parametrization in: residual, or q (the q rows)
    optional: bool = False  # only when the model has it (biases of --add-bias-linear)
    fill: str = ""  # export writes zeros of this size (a Dims field) when ours lacks it


def row(ours: str, theirs: Union[str, Sequence[str]], layout: str = SAME, **kw) -> Row:
    return Row(ours, (theirs,) if isinstance(theirs, str) else tuple(theirs), layout, **kw)


def weight_and_bias(ours: str, theirs: Union[str, Sequence[str]], layout: str = SAME, **kw) -> Tuple[Row, Row]:
    """A linear layer: its weight, and its bias when the model has one."""
    theirs = (theirs,) if isinstance(theirs, str) else tuple(theirs)
    return (row(f"{ours}.weight", [f"{t}.weight" for t in theirs], layout, **kw),
            row(f"{ours}.bias", [f"{t}.bias" for t in theirs], layout, optional=True, **kw))


@dataclasses.dataclass(frozen=True)
class Block:
    """Rows under a megatron-core prefix and a Hugging Face prefix, relative to a decoder layer's
    (``where``: ``layer``; ``dense`` / ``moe``: a layer with a dense MLP / an MoE; ``expert``: each
    expert of an MoE layer, ``{e}`` in the prefixes), or the model's (``model``)."""

    where: str
    ours: str
    theirs: str
    rows: Tuple[Row, ...]
    when: str = ""  # a Dims flag the block needs ("q_lora")
    unless: str = ""  # a Dims flag that rules it out


@dataclasses.dataclass(frozen=True)
class Either:
    """Layouts of the same tensors: export writes the first; import reads, per layer, the first
    whose first Hugging Face tensor is there."""

    choices: Tuple[Tuple[Block, ...], ...]


@dataclasses.dataclass(frozen=True)
class Mapping:
    """An architecture: the model's tensors before the layers, each decoder layer's, and after."""

    layer: Tuple[str, str]  # (our prefix, theirs) of decoder layer {i}
    first: Tuple[Row, ...]
    layers: Tuple[Union[Block, Either], ...]
    last: Tuple[Row, ...]

    @property
    def embedding(self) -> str:  # their input embedding (the tied output layer)
        return self.first[0].theirs[0]


# -- the table ----------------------------------------------------------------------------------
_LLAMA_FIRST = (row("embedding.word_embeddings.weight", "model.embed_tokens.weight"),)
_LLAMA_LAST = (row("decoder.final_layernorm.weight", "model.norm.weight"),)
_LLAMA_NORMS = (row("input_layernorm.weight", "input_layernorm.weight"),
                row("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"))
_LLAMA_ATTENTION = Block("layer", "self_attention.", "self_attn.", (
    *weight_and_bias("linear_qkv", ("q_proj", "k_proj", "v_proj"), QKV, scale="q"),
    *weight_and_bias("linear_proj", "o_proj", scale="residual")))
_LLAMA_LAYER = (Block("layer", "", "", _LLAMA_NORMS), _LLAMA_ATTENTION)


def _swiglu(scale: str = "", bias: bool = False) -> Tuple[Row, ...]:
    """A SwiGLU MLP in Hugging Face's gate_proj / up_proj / down_proj."""
    fc1 = weight_and_bias("linear_fc1", ("gate_proj", "up_proj"), GATE_UP)
    fc2 = weight_and_bias("linear_fc2", "down_proj", scale=scale)
    return (*fc1, *fc2) if bias else (fc1[0], fc2[0])


MAPPINGS: Dict[str, Mapping] = {
    LLAMA: Mapping(("decoder.layers.{i}.", "model.layers.{i}."), _LLAMA_FIRST, (
        *_LLAMA_LAYER, Block("dense", "mlp.", "mlp.", _swiglu("residual", bias=True))), _LLAMA_LAST),
    # Mixtral / LLaMA-MoE: every layer an MoE of SwiGLU experts (w1 gate, w3 up, w2 down)
    MIXTRAL: Mapping(("decoder.layers.{i}.", "model.layers.{i}."), _LLAMA_FIRST, (*_LLAMA_LAYER, Either((
        (Block("moe", "mlp.", "block_sparse_moe.", (row("router.weight", "gate.weight"),)),  # the hub's layout
         Block("expert", "mlp.experts.local_experts.{e}.", "block_sparse_moe.experts.{e}.", (
             row("linear_fc1.weight", ("w1.weight", "w3.weight"), GATE_UP),
             row("linear_fc2.weight", "w2.weight", scale="residual")))),
        (Block("moe", "mlp.", "mlp.", (  # transformers 5's fused experts (read only)
            row("router.weight", "gate.weight"),
            row("experts.local_experts.{e}.linear_fc1.weight", "experts.gate_up_proj", STACKED),
            row("experts.local_experts.{e}.linear_fc2.weight", "experts.down_proj", STACKED, scale="residual"))),),
    ))), _LLAMA_LAST),
    DEEPSEEK_V3: Mapping(("decoder.layers.{i}.", "model.layers.{i}."), _LLAMA_FIRST, (
        Block("layer", "", "", _LLAMA_NORMS),
        Block("layer", "self_attention.", "self_attn.", (
            row("linear_kv_down_proj.weight", "kv_a_proj_with_mqa.weight"),
            row("kv_layernorm.weight", "kv_a_layernorm.weight"),
            row("linear_kv_up_proj.weight", "kv_b_proj.weight"),
            row("linear_proj.weight", "o_proj.weight"))),
        Block("layer", "self_attention.", "self_attn.", (
            row("linear_q_down_proj.weight", "q_a_proj.weight"),
            row("q_layernorm.weight", "q_a_layernorm.weight"),
            row("linear_q_up_proj.weight", "q_b_proj.weight")), when="q_lora"),
        Block("layer", "self_attention.", "self_attn.", (row("linear_q_proj.weight", "q_proj.weight"),),
              unless="q_lora"),
        Block("moe", "mlp.", "mlp.", (row("router.weight", "gate.weight"),
                                      row("router.expert_bias", "gate.e_score_correction_bias", fill="experts"))),
        Block("expert", "mlp.experts.local_experts.{e}.", "mlp.experts.{e}.", _swiglu()),
        Block("moe", "mlp.shared_experts.", "mlp.shared_experts.", _swiglu()),
        Block("dense", "mlp.", "mlp.", _swiglu()),
    ), _LLAMA_LAST),
    # GPT-2 always has biases (zeros compute what a model without them does) and Conv1D weights
    GPT2: Mapping(("decoder.layers.{i}.", "transformer.h.{i}."), (
        row("embedding.word_embeddings.weight", "transformer.wte.weight"),
        row("embedding.position_embeddings.weight", "transformer.wpe.weight")), (
        Block("layer", "", "", (
            row("input_layernorm.weight", "ln_1.weight"), row("input_layernorm.bias", "ln_1.bias"),
            row("self_attention.linear_qkv.weight", "attn.c_attn.weight", QKV_CAT, conv1d=True, scale="q"),
            row("self_attention.linear_qkv.bias", "attn.c_attn.bias", QKV_CAT, scale="q", fill="qkv"),
            row("self_attention.linear_proj.weight", "attn.c_proj.weight", conv1d=True, scale="residual"),
            row("self_attention.linear_proj.bias", "attn.c_proj.bias", scale="residual", fill="hidden"),
            row("pre_mlp_layernorm.weight", "ln_2.weight"), row("pre_mlp_layernorm.bias", "ln_2.bias"),
            row("mlp.linear_fc1.weight", "mlp.c_fc.weight", conv1d=True),
            row("mlp.linear_fc1.bias", "mlp.c_fc.bias", fill="ffn"),
            row("mlp.linear_fc2.weight", "mlp.c_proj.weight", conv1d=True, scale="residual"),
            row("mlp.linear_fc2.bias", "mlp.c_proj.bias", scale="residual", fill="hidden"))),
    ), (row("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
        row("decoder.final_layernorm.bias", "transformer.ln_f.bias"))),
}
OUTPUT = row("output_layer.weight", "lm_head.weight")  # untied output layers (tied ones are the embedding)


def mapping_of(architecture: str) -> Mapping:
    return MAPPINGS.get(architecture, MAPPINGS[LLAMA])  # Mistral reads as Llama


# -- reading the table --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Dims:
    """What expands the table for one model (from our saved flags, or a Hugging Face config)."""

    layers: int
    groups: int
    per_group: int
    head_dim: int
    hidden: int
    ffn: int
    experts: int
    moe_layers: Tuple[bool, ...]
    q_lora: bool

    @property
    def qkv(self) -> int:  # rows of the fused QKV
        return (self.per_group + 2) * self.groups * self.head_dim


def _dims_of_args(args) -> Dims:
    heads = args.num_attention_heads
    groups = getattr(args, "num_key_value_heads", None) or heads
    experts = getattr(args, "num_experts", None) or 0
    pattern = moe_pattern(args) or [0] * args.num_layers
    return Dims(args.num_layers, groups, heads // groups, args.hidden_size // heads, args.hidden_size,
                args.ffn_hidden_size, experts, tuple(bool(p) for p in pattern),
                bool(getattr(args, "q_lora_rank", None)))


def _dims_of_config(config) -> Dims:
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    experts = getattr(config, "num_local_experts", None) or getattr(config, "n_routed_experts", None) or 0
    dense = getattr(config, "first_k_dense_replace", None) or 0
    layers = config.num_hidden_layers
    ffn = getattr(config, "intermediate_size", None) or 0  # (only export's zero biases need it)
    return Dims(layers, groups, heads // groups, config.hidden_size // heads, config.hidden_size, ffn, experts,
                tuple(bool(experts) and i >= dense for i in range(layers)), getattr(config, "q_lora_rank", None) is not None)


def _blocks_of_layer(mapping: Mapping, dims: Dims, i: int, choose) -> Iterator[Block]:
    """The blocks of decoder layer i (``choose(choices, i)``: the index of an ``Either``'s layout)."""
    for entry in mapping.layers:
        for block in entry.choices[choose(entry.choices, i)] if isinstance(entry, Either) else (entry,):
            moe = dims.moe_layers[i]
            if block.where == "dense" and moe or block.where in ("moe", "expert") and not moe:
                continue
            if block.when and not getattr(dims, block.when) or block.unless and getattr(dims, block.unless):
                continue
            yield block


def _expand(mapping: Mapping, dims: Dims, choose=lambda choices, i: 0) -> Iterator[Tuple[Row, List[str], List[str]]]:
    """Every row of ``mapping`` for a model of ``dims`` in model order: ``(row, our names, their
    names)`` (several of ours for a STACKED row: one per expert). ``choose(choices, i)`` picks the
    layout of an ``Either`` in layer i (default: the first, the one export writes)."""
    for r in mapping.first:
        yield r, [r.ours], list(r.theirs)
    ours_layer, theirs_layer = mapping.layer
    for i in range(dims.layers):
        for block in _blocks_of_layer(mapping, dims, i, choose):
            experts = range(dims.experts) if block.where == "expert" else [None]
            for e in experts:
                ours = (ours_layer + block.ours).format(i=i, e=e)
                theirs = (theirs_layer + block.theirs).format(i=i, e=e)
                for r in block.rows:
                    if r.layout == STACKED:
                        names = [(ours + r.ours).format(e=k) for k in range(dims.experts)]
                    else:
                        names = [ours + r.ours]
                    yield r, names, [theirs + t for t in r.theirs]
    for r in mapping.last:
        yield r, [r.ours], list(r.theirs)


def _to_theirs(r: Row, tensors: List[torch.Tensor], dims: Dims, q_factor: float) -> List[torch.Tensor]:
    if r.layout == STACKED:
        return [torch.stack(tensors)]
    (t,) = tensors
    if r.layout in (QKV, QKV_CAT):
        q, k, v = split_qkv(t, dims.groups, dims.per_group, dims.head_dim)
        parts = [q * q_factor if r.scale == "q" else q, k, v]
        if r.layout == QKV_CAT:
            parts = [torch.cat(parts, dim=0)]
    elif r.layout == GATE_UP:
        parts = list(t.chunk(2, dim=0))
    else:
        parts = [t]
    return [p.t() if r.conv1d else p for p in parts]


def _to_ours(r: Row, tensors: List[torch.Tensor], dims: Dims) -> List[torch.Tensor]:
    tensors = [t.t() if r.conv1d else t for t in tensors]
    if r.layout == STACKED:
        return list(tensors[0].unbind(0))
    if r.layout == QKV_CAT:
        kv = dims.groups * dims.head_dim
        tensors = list(tensors[0].split([dims.qkv - 2 * kv, kv, kv], dim=0))
    if r.layout in (QKV, QKV_CAT):
        return [join_qkv(*tensors, dims.groups, dims.per_group, dims.head_dim)]
    if r.layout == GATE_UP:
        return [torch.cat(tensors, dim=0)]
    return tensors


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

    mapping, dims = mapping_of(architecture), _dims_of_args(args)
    out: Dict[str, torch.Tensor] = {}
    for r, ours, theirs in _expand(mapping, dims):
        if ours[0] not in state and (r.optional or r.fill):
            if r.optional:
                continue
            tensors = [torch.zeros(getattr(dims, r.fill))]
        else:
            tensors = [take(name) for name in ours]
        if r.scale == "residual":
            tensors = [t * residual for t in tensors]
        out.update(zip(theirs, _to_theirs(r, tensors, dims, q_factor)))
    tie = not getattr(args, "untie_embeddings_and_output_weights", False)
    if not tie:
        out[OUTPUT.theirs[0]] = take(OUTPUT.ours) * logit
    elif logit != 1.0:
        out[OUTPUT.theirs[0]] = out[mapping.embedding] * logit
        tie = False
        notes.append("tied embeddings exported untied: the logit multiplier scales only the output copy")
    leftover = sorted(set(state) - used)
    if leftover:
        raise HFError(f"the checkpoint has {leftover[0]}, which the {architecture} mapping does not use")
    return {k: v.contiguous() for k, v in out.items()}, tie, notes


# -- import -----------------------------------------------------------------------------------
def from_hf(get: Callable[[str], torch.Tensor], names: List[str], config, architecture: str) -> Dict[str, torch.Tensor]:
    """Whole megatron-core tensors (vocabulary unpadded) of a model whose tensors ``get(name)``
    returns; ``names`` are all the names it holds. The table read the other way, without
    multipliers (imported models use ``--parametrization sp``)."""
    have = set(names)
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in have:
            raise HFError(f"the Hugging Face weights have no {name}")
        used.add(name)
        return get(name)

    def present(choices, i) -> int:  # the layout whose first tensor layer i has (else the first)
        theirs_layer = mapping.layer[1].format(i=i)
        for n, blocks in enumerate(choices):
            block = blocks[0]
            if (theirs_layer + block.theirs).format(e=0) + block.rows[0].theirs[0] in have:
                return n
        return 0

    mapping, dims = mapping_of(architecture), _dims_of_config(config)
    out: Dict[str, torch.Tensor] = {}
    for r, ours, theirs in _expand(mapping, dims, present):
        if r.optional and theirs[0] not in have:
            continue
        out.update(zip(ours, _to_ours(r, [take(name) for name in theirs], dims)))
    if not getattr(config, "tie_word_embeddings", False):
        out[OUTPUT.ours] = take(OUTPUT.theirs[0])
    elif OUTPUT.theirs[0] in have:
        used.add(OUTPUT.theirs[0])  # a tied copy some checkpoints store anyway
    leftover = sorted(n for n in have - used if not n.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise HFError(f"the Hugging Face weights have {leftover[0]}, which the {architecture} mapping does not use")
    return out
