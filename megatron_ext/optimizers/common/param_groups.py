"""Param grouping shared by every optimizer.

Roles are decided from the module a parameter belongs to (its megatron-core name), never from its
size: ``embedding`` (word/position embeddings), ``output`` (the unembedding), ``norm`` (norm
weights inside the blocks), ``final_norm`` (the norm before the output layer), ``bias``, and
``hidden`` (the 2-D weight matrices inside transformer blocks). Norm weights and biases get no
weight decay. Each group carries ``role``, ``lr_mult``, ``wd_mult`` and ``eps_mult``; a
parametrization may change the multipliers per role (CompleteP treats the final norm unlike the
block norms, hence its own role). ``router`` is an MoE layer's gate (experts x hidden): a small
classifier over the experts rather than a hidden transform, so it stays with the element-wise
optimizer (never Muon/Shampoo's matrix update) and keeps weight decay and the base LR under every
parametrization. The experts' own weights (routed and shared) are ``hidden`` matrices like a dense
MLP's, and so are multi-latent attention's low-rank projections (``linear_q_down_proj``,
``linear_kv_up_proj``...): each maps one width of the block to another, and Muon/Shampoo update it
whole. The aux-loss-free ``expert_bias`` is a buffer, never an optimizer's (docs/deepseek_v3.md).

Two layouts add to the roles (docs/parallelism.md):
* pipeline parallelism: a later stage's copy of the word embedding (a tied output layer, which
  megatron-core calls ``output_layer.weight`` there, marked ``shared_embedding``) IS the embedding:
  role ``embedding``, so both copies get the same multipliers and the same update;
* expert parallelism: experts spread over ranks (DeepSpeed MoE parameters, carrying the
  ``group_name`` of their expert groups) go to groups of their own, one per role, marked
  ``moe: True`` and ``name`` as DeepSpeed's ZeRO expects (it partitions them over the
  expert-data-parallel group).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import torch

ROLES = ("embedding", "output", "hidden", "router", "norm", "final_norm", "bias")
NO_DECAY_ROLES = ("norm", "final_norm", "bias")

_NORM = re.compile(r"(^|\.)(\w*layernorm\w*|\w*_norm|norm)(\.|$)|layer_norm_weight$|layer_norm_bias$")


def param_role(name: str, param: torch.Tensor) -> str:
    if name.endswith(".bias") or name.endswith("layer_norm_bias"):
        return "bias"
    if _NORM.search(name):
        return "final_norm" if "final_layernorm" in name or "final_norm" in name else "norm"
    if "embedding" in name:
        return "embedding"
    if name.startswith("output_layer") or ".output_layer." in name:
        return "output"
    if name.endswith("mlp.router.weight"):
        return "router"
    # a ZeRO 3 partitioned parameter is an empty 1-D placeholder; DeepSpeed keeps its shape in ds_shape
    if len(getattr(param, "ds_shape", None) or param.shape) >= 2:
        return "hidden"
    return "norm"  # any other 1-D weight is a gain: treat like a norm (no decay)


def build_param_groups(
    model: torch.nn.Module,
    multipliers: Optional[Callable[[str], Dict[str, float]]] = None,
) -> List[dict]:
    """One group per role present in the model (order stable; experts spread over ranks in groups of
    their own), with lr/wd multipliers.

    ``multipliers(role)`` may return ``lr_mult``/``wd_mult``/other per-group options (e.g. from a
    parametrization); decay-free roles always keep ``wd_mult`` 0.
    """
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = "embedding" if getattr(param, "shared_embedding", False) else param_role(name, param)
        experts = getattr(param, "group_name", None)  # spread over expert-parallel ranks
        group = groups.get((role, experts))
        if group is None:
            group = groups[(role, experts)] = {"params": [], "param_names": [], "role": role, "lr_mult": 1.0,
                                               "wd_mult": 1.0, "eps_mult": 1.0}
            if experts is not None:
                group.update(moe=True, name=experts)
            if multipliers is not None:
                group.update(multipliers(role))
            if role in NO_DECAY_ROLES:
                group["wd_mult"] = 0.0
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())
