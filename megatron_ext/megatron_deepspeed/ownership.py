"""Who runs each family in this fork process: megatron_ext or the fork itself.

* ``optimizer``: ours when ``--optimizer`` names a registered optimizer (under ``new``: one the
  fork's ``--optimizer`` choices lack, e.g. ``shampoo``, ``lion``, ``lamb``).
* ``schedule``: ours when ``--lr-decay-style`` names a registered decay style (under ``new``: one
  the fork lacks, e.g. ``wsd``).
* ``init`` (init stds, ``--adjust-word-embedding-init``, ``--parametrization``): ours under ``all``;
  under ``new`` only when one of our own init / parametrization flags is used.
* ``lr_finder``: ours under ``all`` (replacing the fork's inline finder); the fork's under ``new``.
"""
from __future__ import annotations

import dataclasses
from typing import List

from megatron_ext.megatron_deepspeed import project_api

FAMILIES = ("optimizer", "schedule", "init", "lr_finder")


@dataclasses.dataclass(frozen=True)
class Ownership:
    mode: str
    optimizer: bool
    schedule: bool
    init: bool
    lr_finder: bool
    optimizer_name: str = ""
    schedule_name: str = ""

    @classmethod
    def decide(cls, mode: str, args, fork_optimizers: List[str], fork_schedules: List[str],
               init_flags_given: List[str]) -> "Ownership":
        optimizers, schedules, _ = project_api.registries()
        opt, style = str(getattr(args, "optimizer", "")), str(getattr(args, "lr_decay_style", ""))
        if mode == "all":
            return cls(mode, opt in optimizers, style in schedules, True, True, opt, style)
        return cls(mode, opt in optimizers and opt not in fork_optimizers,
                   style in schedules and style not in fork_schedules,
                   bool(init_flags_given)
                   or project_api.parametrization_name(args) != project_api.DEFAULT_PARAMETRIZATION,
                   False, opt, style)

    def ours(self, family: str) -> bool:
        return bool(getattr(self, family))

    def any(self) -> bool:
        return any(self.ours(f) for f in FAMILIES)

    def why_not(self, family: str) -> str:
        if family == "optimizer":
            return f"--optimizer {self.optimizer_name} is Megatron-DeepSpeed's own (MEGATRON_EXT_PLUGINS={self.mode})"
        if family == "schedule":
            return (f"--lr-decay-style {self.schedule_name} is Megatron-DeepSpeed's own "
                    f"(MEGATRON_EXT_PLUGINS={self.mode})")
        if family == "lr_finder":
            return "Megatron-DeepSpeed's own --lr-finder runs under MEGATRON_EXT_PLUGINS=new (use all for ours)"
        return f"megatron_ext's init is off (MEGATRON_EXT_PLUGINS={self.mode})"

    def summary(self) -> str:
        who = {True: "megatron_ext", False: "Megatron-DeepSpeed"}
        return (f"megatron_ext plug-ins ({self.mode}): optimizer {self.optimizer_name} by {who[self.optimizer]}, "
                f"LR schedule {self.schedule_name} by {who[self.schedule]}, init by {who[self.init]}, "
                f"LR finder by {who[self.lr_finder]}")
