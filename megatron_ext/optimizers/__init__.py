"""Optimizer plug-ins (``--optimizer``). One file per optimizer; each registers a builder
``build(param_groups, args) -> torch.optim.Optimizer`` with ``OPTIMIZERS.register``. Param groups
come from ``common.param_groups.build_param_groups`` and carry ``lr_mult``/``wd_mult`` that the LR
scheduler applies and ``eps_mult`` applied here, so schedules and parametrizations work with every
optimizer. The record (``OptimizerPlugin``) declares, as typed fields: ``validate(args)`` for the
optimizer's own flags, the engine settings it supports (``engine``: ZeRO stages, CPU offload...),
and ``width_lr_exponents(args) -> {role: e}``: under muP a role's LR scales as m_N^e (default:
Adam's rules, hidden -1); ``summary(args) -> str``: what the optimizer resolved (e.g. Muon's
Newton-Schulz precision on this machine), for the start-up table; ``memory``
(``common/state_memory.OptimizerMemory``): the state it keeps and what its step allocates, which
the memory plan (``megatron_ext.planning``) reads. What the training loop calls on the optimizer object beyond
``step``: the hook protocol in ``common/hooks.py``."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

from megatron_ext.registry import Plugin, Registry
from megatron_ext.optimizers.common.param_groups import build_param_groups


@dataclasses.dataclass(frozen=True)
class OptimizerPlugin(Plugin):
    width_lr_exponents: Optional[Callable[[Any], Dict[str, float]]] = None
    summary: Optional[Callable[[Any], str]] = None  # one line for the start-up table
    memory: Any = None  # common.state_memory.OptimizerMemory: its state and step workspace, for the memory plan

    @property
    def build(self) -> Callable:
        return self.obj


# Megatron-DeepSpeed's launchers pass --adam-beta1/2 and --adam-eps whatever the optimizer, so
# another optimizer's flags are tolerated here (schedules and parametrizations refuse them).
OPTIMIZERS = Registry("optimizer", "optimizers (--optimizer)", package=__name__, record=OptimizerPlugin,
                      flag="--optimizer", refuse_foreign_flags=False)


def build_optimizer(model, args, parametrization):
    """The ``--optimizer`` of ``args`` over ``model``'s param groups, with the parametrization's
    per-role multipliers."""

    return build_optimizer_from_groups(build_param_groups(model, parametrization.group_options), args)


def build_optimizer_from_groups(groups, args):
    """The ``--optimizer`` of ``args`` over ``groups``, each group's epsilon scaled by its
    ``eps_mult`` once, here (both trainers build through this)."""
    optimizer = OPTIMIZERS.get(args.optimizer).build(groups, args)
    for group in optimizer.param_groups:
        if "eps" in group and group.get("eps_mult", 1.0) != 1.0:
            group["eps"] = group["eps"] * group["eps_mult"]
    return optimizer
