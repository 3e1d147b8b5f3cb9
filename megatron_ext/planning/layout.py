"""Parallel layouts: tensor x pipeline x expert x sequence x data parallel, and which of them a
runner can run (``RUNNABLE``: the one table the search and the refusals read).

World size = TP x PP x SP x DP. Expert parallelism is carved out of the data-parallel ranks (EP
divides DP): an expert weight is split over EP and replicated over the DP/EP expert-data-parallel
ranks. Sequence parallelism is DeepSpeed-Ulysses (the fork's ``--ds-sequence-parallel-size``):
each rank holds 1/SP of every sequence, and ZeRO partitions over the SP x DP ranks.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

from megatron_ext import derivations


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sp: int = 1
    dp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.sp * self.dp

    @property
    def zero_ranks(self) -> int:
        """The ranks ZeRO partitions a dense parameter over (DeepSpeed's sequence-data-parallel group)."""
        return self.dp * self.sp

    @property
    def expert_zero_ranks(self) -> int:
        """The ranks ZeRO partitions an expert parameter over (expert-data-parallel)."""
        return self.dp * self.sp // self.ep

    def spell(self) -> str:
        return f"TP{self.tp} x PP{self.pp} x EP{self.ep} x SP{self.sp} x DP{self.dp}"


@dataclasses.dataclass(frozen=True)
class Runner:
    """What one runner runs, per dimension: the largest size it takes (None: any) and the ZeRO
    stages allowed with that dimension above 1."""

    name: str
    max_size: Dict[str, Optional[int]]  # tp, pp, ep, sp -> None (any) or the largest size
    zero_stages: Tuple[int, ...]  # with only TP x DP
    zero_stages_with: Dict[str, Tuple[int, ...]]  # a dimension > 1 -> the ZeRO stages allowed with it
    max_size_with_moe: Dict[str, int] = dataclasses.field(default_factory=dict)  # a mixture of experts' limits

    def problem(self, layout: Layout, zero_stage: int, moe: bool = False) -> Optional[str]:
        for dim in ("tp", "pp", "ep", "sp"):
            size, largest = getattr(layout, dim), self.max_size.get(dim)
            if moe and dim in self.max_size_with_moe:
                largest = self.max_size_with_moe[dim] if largest is None else min(largest, self.max_size_with_moe[dim])
            if largest is not None and size > largest:
                return f"{self.name} runs {dim.upper()} up to {largest}{' with MoE' if moe else ''}, not {size}"
        allowed = set(self.zero_stages)
        for dim, stages in self.zero_stages_with.items():
            if getattr(layout, dim) > 1:
                allowed &= set(stages)
        if zero_stage not in allowed:
            return f"{self.name} runs ZeRO {'/'.join(map(str, sorted(allowed)))} with this layout, not {zero_stage}"
        return None


# What runs today: our trainer's TP x PP x EP x DP (docs/parallelism.md): pipeline stages at ZeRO
# 0/1, experts spread over ranks at ZeRO 0-2, a mixture of experts at TP 1 (megatron-core's MoE
# with TP needs sequence parallelism); the rules are derivations.py's, which the run plan applies.
RUNNABLE = {
    "megatron_ext": Runner("our trainer", {"tp": None, "pp": None, "ep": None, "sp": 1}, (0, 1, 2, 3),
                           {"pp": derivations.PIPELINE_ZERO_STAGES, "ep": derivations.EXPERT_ZERO_STAGES},
                           max_size_with_moe={"tp": 1}),
}


# DeepSpeed's rule: its pipeline engine runs ZeRO 0 and 1 only (whichever runner uses it).
PIPELINE_ZERO_STAGES = derivations.PIPELINE_ZERO_STAGES


def deepspeed_problem(layout: Layout, zero_stage: int) -> Optional[str]:
    if layout.pp > 1 and zero_stage not in PIPELINE_ZERO_STAGES:
        return f"DeepSpeed's pipeline engine runs ZeRO 0/1 only, not {zero_stage} with PP {layout.pp}"
    return None


def runnable(layout: Layout, zero_stage: int, moe: bool = False, precision: str = "fp32",
             cpu_offload: bool = False) -> Tuple[Optional[str], Optional[str]]:
    """``(runner name, None)`` for the first runner that runs it, or ``(None, why not)``."""
    problem = deepspeed_problem(layout, zero_stage) or derivations.layout_engine_problem(
        layout.pp, layout.ep, zero_stage, precision, cpu_offload)
    if problem:
        return None, problem
    reasons = []
    for key, runner in RUNNABLE.items():
        problem = runner.problem(layout, zero_stage, moe)
        if problem is None:
            return key, None
        reasons.append(problem)
    return None, "; ".join(reasons)
