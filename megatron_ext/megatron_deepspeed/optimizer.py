"""``get_megatron_optimizer`` for a registered optimizer, over the fork's model.

Param groups are our trainer's: one role per parameter (embedding, hidden, output, router, norm,
final_norm, bias), decided from the megatron-core name of each fork parameter (``names.py``), so
``N.lm_head.weight`` of ``GPTModelPipe`` is the output layer and DeepSpeed-MoE's
``deepspeed_moe.gate.wg.weight`` the router. The parametrization's per-role multipliers apply.

When the roles make no difference to the optimizer (an element-wise one, every decaying role
with the same multipliers), the groups are laid out exactly as the fork lays out its own: one
decaying group, then one without decay, parameters in model order. DeepSpeed's ZeRO partitions
are then the fork's, so a ZeRO checkpoint moves between the fork's own AdamW and ours both ways,
and losses match the fork's to rounding. Matrix optimizers (Muon, Shampoo) keep one group per role.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, List, Tuple

from megatron_ext.megatron_deepspeed import names, project_api
from megatron_ext.megatron_deepspeed.errors import ActivationError

_KEYS_NOT_OPTIONS = ("params", "param_names", "role", "name")


class NamedAsCore:
    """The fork's models seen through megatron-core names (what ``build_param_groups`` reads)."""

    def __init__(self, models: Iterable):
        self.entries: List[Tuple[str, str, object]] = []
        for model in models:
            self.entries += names.core_names(model.named_parameters())

    def named_parameters(self):
        for _, core, param in self.entries:
            yield core, param


def build(models, args, parametrization, no_weight_decay_cond=None, scale_lr_cond=None, lr_mult=1.0):
    """Our ``--optimizer`` over ``models`` (the fork's unwrapped modules)."""
    if no_weight_decay_cond is not None or (scale_lr_cond is not None and lr_mult != 1.0):
        raise ActivationError("this entry point passes its own weight-decay / LR-scaling conditions to "
                              "get_megatron_optimizer, which megatron_ext's param groups would ignore; run it with "
                              "MEGATRON_EXT_PLUGINS=off (or new with one of the fork's optimizers)")
    try:
        named = NamedAsCore(models)
    except names.UnknownParameterError as e:
        raise ActivationError(str(e)) from None
    groups = project_api.param_groups(named, parametrization)
    if getattr(args, "create_moe_param_group", False):
        groups = _moe_groups(groups)
    optimizer = project_api.build_optimizer_from_groups(_copy(groups), args)
    if not project_api.is_hybrid_matrix_optimizer(optimizer):
        merged = fork_layout(groups, optimizer.param_groups, named)
        if merged is not None:
            optimizer = project_api.build_optimizer_from_groups(merged, args)
    return optimizer


def _copy(groups):
    return [{**g, "params": list(g["params"])} for g in groups]


def _options(group) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in group.items() if k not in _KEYS_NOT_OPTIONS))


def fork_layout(groups, built_groups, named: NamedAsCore):
    """The fork's two groups (decay, then no decay; model order) built from our role ``groups``
    when the optimizer treated every role of a class alike (``built_groups``: what its builder
    made of them); None when merging would change any option."""
    classes: "OrderedDict[tuple, List[int]]" = OrderedDict()
    for index, built in enumerate(built_groups):
        classes.setdefault(_options(built), []).append(index)
    decays = [groups[indices[0]]["wd_mult"] > 0 for indices in classes.values()]
    if len(classes) > 2 or len(set(decays)) != len(classes):
        return None
    class_of = {id(p): key for key, indices in classes.items() for i in indices for p in groups[i]["params"]}
    out = []
    for key, indices in sorted(classes.items(), key=lambda kv: groups[kv[1][0]]["wd_mult"] == 0):  # decay first
        first = groups[indices[0]]
        merged = {k: v for k, v in first.items() if k not in _KEYS_NOT_OPTIONS}
        merged["role"] = "+".join(groups[i]["role"] for i in indices)
        merged["name"] = "wd_no_scale_lr" if first["wd_mult"] > 0 else "no_wd_no_scale_lr"
        merged["params"] = [p for _, _, p in named.entries if class_of.get(id(p)) == key]  # model order
        out.append(merged)
    return out


def _moe_groups(groups):
    """DeepSpeed's engine wants expert parameters in groups of their own marked ``moe`` (what the
    fork's ``--create-moe-param-group`` does to its groups); our role groups are split the same way."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    plain = [{**{k: v for k, v in g.items() if k != "param_names"}, "name": g["role"]} for g in groups]
    return split_params_into_different_moe_groups_for_optimizer(plain)
