"""Whole tensors from tensor-parallel shards of a megatron-core GPT model, and back.

The layout of each parameter is the one the checkpoint itself records for DeepSpeed's universal
conversion (``universal_checkpoint_info``, rebuilt from the saved flags by
``training/universal.py``): replicated (norms, row-parallel biases, routers), row-parallel
(``linear_proj``/``linear_fc2`` weights: split along columns), SwiGLU's fused ``linear_fc1``
(each shard is ``[gate_r; up_r]``), vocabulary tensors (rows, padded to a multiple of the TP
size) and, for everything else, column-parallel (rows; the fused QKV holds whole query groups
per shard, so concatenating shards keeps megatron-core's per-group ``[q, k, v]`` order).

Written here because DeepSpeed's own merge (``ds_to_universal``) works only on the per-parameter
files it extracts from ZeRO optimizer partitions, which ZeRO 0 and ZeRO 3 checkpoints lack; the
rules are the same, and tests check the result against that converter on a TP=2 checkpoint.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List

import torch

REPLICATED, ROW, GATED_COLUMN, VOCAB, COLUMN = "replicated", "row", "gated_column", "vocab", "column"


def layout(name: str, info: Dict[str, Any]) -> str:
    """How ``name`` is split across tensor-parallel ranks, from a ``universal_checkpoint_info``."""
    from deepspeed.checkpoint import constants as c

    def matches(key: str) -> bool:
        return any(re.match(p, name) for p in info.get(key) or [])

    if matches(c.TP_REPLICATED_PARAMETER_PATTERNS):
        return REPLICATED
    if matches(c.VOCABULARY_PARAMETER_PATTERNS):
        return VOCAB
    if matches(c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS):
        return ROW
    if matches(c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0):
        return GATED_COLUMN
    return COLUMN


def merge(name: str, shards: List[torch.Tensor], info: Dict[str, Any]) -> torch.Tensor:
    """The whole tensor from its shards (in TP-rank order); vocabulary rows stay padded."""
    if len(shards) == 1:
        return shards[0]
    kind = layout(name, info)
    if kind == REPLICATED:
        return shards[0]
    if kind == ROW:
        return torch.cat(shards, dim=1)
    if kind == GATED_COLUMN:  # [gate_r; up_r] per shard -> [gate; up]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)  # column-parallel and vocabulary rows


def split(name: str, tensor: torch.Tensor, tp: int, info: Dict[str, Any]) -> List[torch.Tensor]:
    """The ``tp`` shards of a whole tensor (vocabulary tensors already padded to a multiple of tp)."""
    if tp == 1:
        return [tensor]
    kind = layout(name, info)
    if kind == REPLICATED:
        return [tensor] * tp
    if kind == ROW:
        return list(tensor.chunk(tp, dim=1))
    if kind == GATED_COLUMN:
        gate, up = tensor.chunk(2, dim=0)
        return [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp, dim=0), up.chunk(tp, dim=0))]
    return list(tensor.chunk(tp, dim=0))
