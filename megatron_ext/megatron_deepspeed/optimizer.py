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

Every rank ends up with the same NUMBER of groups: DeepSpeed's ZeRO 1/2 reduces each group's
gradient norm over the model-parallel group (tensor x pipeline), one all-reduce per group, so ranks
with different counts wait on each other forever (DeepSpeed issue #1522). Pipeline stages hold
different roles (the embedding on the first, the output layer and final norm on the last), so
one group per role gives them different counts: the ranks with fewer groups split their largest
groups in two, with the same options (an optimizer treats two groups with the same options as
one), until every rank has as many as the rank with the most.
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
            groups, optimizer = merged, None
    most = _most_groups_on_any_rank(len(groups))
    if most > len(groups):
        groups, optimizer = split_to_count(groups, most), None
    if optimizer is None:
        optimizer = project_api.build_optimizer_from_groups(_copy(groups), args)
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
    fork's ``--create-moe-param-group`` does to its groups); our role groups are split the same way.
    Each group keeps the names of its parameters (Muon splits QKV by name)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    name_of = {id(p): n for g in groups for p, n in zip(g["params"], g["param_names"])}
    plain = [{**{k: v for k, v in g.items() if k != "param_names"}, "name": g["role"]} for g in groups]
    split = split_params_into_different_moe_groups_for_optimizer(plain)
    return [{**g, "param_names": [name_of[id(p)] for p in g["params"]]} for g in split if g["params"]]


def _most_groups_on_any_rank(count: int) -> int:
    """The largest param-group count of all ranks (every rank builds its optimizer once, in the
    same order, so this one all-reduce is met by all of them)."""
    import torch

    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return count
    from deepspeed.accelerator import get_accelerator

    most = torch.tensor([count], dtype=torch.int64, device=get_accelerator().current_device_name())
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most.item())


def split_to_count(groups, count: int):
    """``groups`` with the largest (most parameters; never DeepSpeed's expert groups) split in two
    until there are ``count``; each half keeps the group's options, so the optimizer does the same."""
    out = _copy(groups)
    while len(out) < count:
        splittable = [i for i, g in enumerate(out) if len(g["params"]) > 1 and not g.get("moe")]
        if not splittable:
            raise ActivationError(f"another rank has {count} optimizer param groups and this one cannot split its "
                                  f"{len(groups)} into as many (DeepSpeed's ZeRO needs the same count on every rank)")
        i = max(splittable, key=lambda k: len(out[k]["params"]))
        group, half = out[i], len(out[i]["params"]) // 2
        halves = [{**group, "params": group["params"][:half]}, {**group, "params": group["params"][half:]}]
        if "param_names" in group:
            halves[0]["param_names"], halves[1]["param_names"] = group["param_names"][:half], group["param_names"][half:]
        out[i:i + 1] = halves
    return out
