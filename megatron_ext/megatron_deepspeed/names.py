"""Parameter names of Megatron-DeepSpeed's GPT models and their megatron-core equivalents.

Measured on the ALCF fork (``docs/megatron_deepspeed.md``): the same tensors, renamed.

* ``GPTModel`` (``--no-pipeline-parallel``): ``language_model.embedding.word_embeddings`` ->
  ``embedding.word_embeddings``; ``language_model.encoder.layers.N.{input_layernorm,
  self_attention.query_key_value, self_attention.dense, post_attention_layernorm,
  mlp.dense_h_to_4h, mlp.dense_4h_to_h}`` -> ``decoder.layers.N.{input_layernorm,
  self_attention.linear_qkv, self_attention.linear_proj, pre_mlp_layernorm, mlp.linear_fc1,
  mlp.linear_fc2}``; ``language_model.encoder.final_layernorm`` -> ``decoder.final_layernorm``;
  ``language_model.output_layer`` -> ``output_layer``. QKV row order, SwiGLU's ``[gate; up]``, RoPE
  and vocabulary padding are the same in both, so values carry over unchanged.
* DeepSpeed-MoE inside a fork layer: ``mlp.deepspeed_moe.gate.wg`` is the router (megatron-core
  ``mlp.router``); ``mlp.deepspeed_moe.experts.deepspeed_experts.E.dense_*`` are expert matrices.
* ``GPTModelPipe`` (the default without ``--no-pipeline-parallel``): a flat list of layers named by
  position: the embedding (``K.word_embeddings`` or ``tied_modules.embed.word_embeddings``), the
  transformer layers (``K.input_layernorm``, ``K.self_attention.query_key_value``...), the final
  norm as a bare ``K.weight`` and the unembedding ``K.lm_head.weight``.

``PipeLayout`` places the names of a whole ``GPTModelPipe`` (``convert``): its layer list is, by
position, 0 a cast of the inputs, 1 the embedding, then the transformer layers, then (MoE models) a
function caching the MoE loss, the final norm, the output layer. A tied embedding is named by its
tie key (``tied_modules.embed.word_embeddings.weight``) on both the first and the last stage.

``core_name`` translates one name (``None`` when it is not a GPT parameter we know); roles are
then decided by the project's own rules on the megatron-core name, so a fork model gets exactly
the roles (embedding, hidden, output, router, norm, final_norm, bias) our trainer gives its model.
"""
from __future__ import annotations

import re
import dataclasses
from typing import Dict, Iterable, List, Optional, Tuple

_LAYER_PARTS = (
    ("self_attention.query_key_value.", "self_attention.linear_qkv."),
    ("self_attention.dense.", "self_attention.linear_proj."),
    ("post_attention_layernorm.", "pre_mlp_layernorm."),
    ("input_layernorm.", "input_layernorm."),
    ("mlp.deepspeed_moe.gate.wg.", "mlp.router."),
    ("mlp.dense_h_to_4h.", "mlp.linear_fc1."),
    ("mlp.dense_4h_to_h.", "mlp.linear_fc2."),
)
_EXPERT = re.compile(r"mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.dense_(h_to_4h|4h_to_h)\.(weight|bias)$")
_FIXED = {
    "language_model.embedding.word_embeddings.": "embedding.word_embeddings.",
    "language_model.embedding.position_embeddings.": "embedding.position_embeddings.",
    "language_model.encoder.final_layernorm.": "decoder.final_layernorm.",
    "language_model.output_layer.": "output_layer.",
}
_LAYER = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.(.+)$")
_PIPE_LAYER = re.compile(r"^(\d+)\.(.+)$")
_PIPE_EMBEDDING = re.compile(r"^(?:\d+|tied_modules\.embed)\.(word|position)_embeddings\.(weight)$")


def _layer_part(rest: str) -> Optional[str]:
    expert = _EXPERT.fullmatch(rest)
    if expert:
        e, which, kind = expert.groups()
        fc = "linear_fc1" if which == "h_to_4h" else "linear_fc2"
        return f"mlp.experts.local_experts.{e}.{fc}.{kind}"
    for fork, core in _LAYER_PARTS:
        if rest.startswith(fork) and rest[len(fork):] in ("weight", "bias"):
            return core + rest[len(fork):]
    return None


def core_name(name: str, pipeline: bool = False) -> Optional[str]:
    """The megatron-core name of the fork parameter ``name`` (``None`` if unknown). With
    ``pipeline`` the names are ``GPTModelPipe``'s (layer indices are positions in the pipe, kept)."""
    if pipeline:
        emb = _PIPE_EMBEDDING.fullmatch(name)
        if emb:
            return f"embedding.{emb.group(1)}_embeddings.weight"
        m = _PIPE_LAYER.fullmatch(name)
        if not m:
            return None
        index, rest = m.groups()
        if rest in ("lm_head.weight",):
            return "output_layer.weight"
        if rest in ("weight", "bias"):  # the bare final norm of the pipe
            return f"decoder.final_layernorm.{rest}"
        part = _layer_part(rest)
        return f"decoder.layers.{index}.{part}" if part else None
    for fork, core in _FIXED.items():
        if name.startswith(fork) and name[len(fork):] in ("weight", "bias"):
            return core + name[len(fork):]
    m = _LAYER.fullmatch(name)
    if m:
        part = _layer_part(m.group(2))
        return f"decoder.layers.{m.group(1)}.{part}" if part else None
    return None


def fork_name(name: str) -> Optional[str]:
    """The fork (``GPTModel``) name of the megatron-core parameter ``name`` (``None`` if unknown)."""
    for fork, core in _FIXED.items():
        if name.startswith(core) and name[len(core):] in ("weight", "bias"):
            return fork + name[len(core):]
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
    if not m:
        return None
    index, rest = m.groups()
    expert = re.fullmatch(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc(1|2)\.(weight|bias)", rest)
    if expert:
        e, fc, kind = expert.groups()
        which = "h_to_4h" if fc == "1" else "4h_to_h"
        return f"language_model.encoder.layers.{index}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.dense_{which}.{kind}"
    for fork, core in _LAYER_PARTS:
        if rest.startswith(core) and rest[len(core):] in ("weight", "bias"):
            return f"language_model.encoder.layers.{index}.{fork}{rest[len(core):]}"
    return None


def is_pipeline_model(names: Iterable[str]) -> bool:
    """``GPTModelPipe``'s parameters are named by pipe position (``0.word_embeddings.weight``...)."""
    return any(_PIPE_LAYER.fullmatch(n) or n.startswith("tied_modules.") for n in names)


class UnknownParameterError(ValueError):
    """A fork parameter whose role cannot be told from its name; the message is one line."""


def core_names(named: Iterable[Tuple[str, object]]) -> List[Tuple[str, str, object]]:
    """``(fork name, megatron-core name, param)`` for every parameter; raises UnknownParameterError
    for a name not mapped (its role would be a guess)."""
    named = list(named)
    pipeline = is_pipeline_model(n for n, _ in named)
    out = []
    for name, param in named:
        core = core_name(name, pipeline)
        if core is None:
            raise UnknownParameterError(
                f"parameter {name} of the Megatron-DeepSpeed model has no known role (not a GPT embedding, layer, "
                "norm, router or output weight); megatron_ext's optimizers, init and parametrizations cannot be "
                "applied to this model: run with MEGATRON_EXT_PLUGINS=off")
        out.append((name, core, param))
    return out


PIPE_EMBEDDING = 1  # GPTModelPipe's layer list: 0 casts the inputs, 1 embeds, the transformer layers follow
PIPE_TIED = "tied_modules.embed."


@dataclasses.dataclass(frozen=True)
class PipeLayout:
    """Where ``GPTModelPipe`` puts each parameter of a model (its positions follow from these three)."""

    num_layers: int
    moe: bool = False  # a function caching the MoE loss sits between the layers and the final norm
    tied: bool = False  # the output layer is the embedding (one tied module on the first and last stage)

    @property
    def final_norm(self) -> int:
        return PIPE_EMBEDDING + 1 + self.num_layers + int(self.moe)

    @property
    def output_layer(self) -> int:
        return self.final_norm + 1

    def core_name(self, name: str) -> Optional[str]:
        """The megatron-core name of a ``GPTModelPipe`` parameter (or layer-file entry ``K.<key>``)."""
        if name.startswith(PIPE_TIED):
            rest = name[len(PIPE_TIED):]
            return f"embedding.{rest}" if rest in ("word_embeddings.weight", "position_embeddings.weight") else None
        m = _PIPE_LAYER.fullmatch(name)
        if not m:
            return None
        index, rest = int(m.group(1)), m.group(2)
        if index == PIPE_EMBEDDING or (self.tied and index == self.output_layer):
            return f"embedding.{rest}" if rest in ("word_embeddings.weight", "position_embeddings.weight") else None
        if index == self.final_norm and rest in ("weight", "bias"):
            return f"decoder.final_layernorm.{rest}"
        if index == self.output_layer and rest == "lm_head.weight":
            return "output_layer.weight"
        layer = index - PIPE_EMBEDDING - 1
        part = _layer_part(rest) if 0 <= layer < self.num_layers else None
        return f"decoder.layers.{layer}.{part}" if part else None

    def fork_name(self, name: str) -> Optional[str]:
        """The ``GPTModelPipe`` name of the megatron-core parameter ``name``."""
        if name.startswith("embedding."):
            return (PIPE_TIED if self.tied else f"{PIPE_EMBEDDING}.") + name[len("embedding."):]
        if name.startswith("decoder.final_layernorm."):
            return f"{self.final_norm}.{name[len('decoder.final_layernorm.'):]}"
        if name == "output_layer.weight" and not self.tied:
            return f"{self.output_layer}.lm_head.weight"
        plain = fork_name(name)  # language_model.encoder.layers.N.<part>
        m = _LAYER.fullmatch(plain or "")
        if not m or int(m.group(1)) >= self.num_layers:
            return None
        return f"{int(m.group(1)) + PIPE_EMBEDDING + 1}.{m.group(2)}"


def rename_map(names: Iterable[str], to_core: bool = True, pipe: Optional[PipeLayout] = None) -> Dict[str, str]:
    """``{name: translated}`` for a set of names (checkpoint conversion); unknown names raise.
    ``pipe``: the fork side is ``GPTModelPipe`` laid out so (else ``GPTModel``)."""
    out = {}
    for name in names:
        if pipe is not None:
            new = pipe.core_name(name) if to_core else pipe.fork_name(name)
        else:
            new = core_name(name) if to_core else fork_name(name)
        if new is None:
            side = "Megatron-DeepSpeed" if to_core else "megatron-core"
            raise UnknownParameterError(f"checkpoint tensor {name}: not a {side} GPT parameter name we can translate")
        out[name] = new
    return out
