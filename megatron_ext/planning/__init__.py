"""Fit before you queue: the memory and time plan of a run (docs/memory_plan.md).

* ``memory``: bytes per device of the most loaded rank, by term, for any layout (TP, PP, EP, SP,
  ZeRO 0-3, precision, offload, recomputation) from the resolved run plan; per-feature terms in
  ``features``, each optimizer's state declared by its plug-in (``optimizers/common/state_memory``);
* ``throughput``: step time from the model's FLOPs at an assumed utilisation of the device's peak
  (``devices``), tokens per second and per day, the whole run in node-hours;
* ``layout``: the parallel layouts and which of them a runner runs (``RUNNABLE``); ``search``: the
  layouts that fit N devices, ranked by estimated throughput;
* ``measure``: the peak memory of a real run, the check of the estimate;
* ``report``: rows, JSON, plot, and the one-line refusal.

The run plan's start-up block and the launcher's dry run show ``plan_rows(plan)``; the trainer,
the launcher and sweeps refuse a launch with ``launch_problem(plan)``.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple
from megatron_ext.planning.report import as_json
from megatron_ext.planning.report import assess
from megatron_ext.planning.report import rows


def assessment_for(plan):
    """The plan on this process's device, with the run's --device-memory/--mfu/--peak-tflops."""

    a = plan.args
    memory = a.device_memory * 1024 ** 3 if getattr(a, "device_memory", None) else None
    return assess(plan, device_memory=memory, mfu=getattr(a, "mfu", None), peak_tflops=getattr(a, "peak_tflops", None))


def plan_rows(plan) -> List[Tuple[str, Any]]:
    """The memory and time rows of the start-up block and the launcher's dry run."""

    return rows(assessment_for(plan))


def plan_record(plan) -> dict:
    """``megatron-ext plan --json``'s record of a run plan on this process's device; its
    ``refusal`` is the line that refuses it (None: it fits, or --allow-oversubscribe)."""

    return as_json(assessment_for(plan))


def launch_problem(plan) -> Optional[str]:
    """One line refusing a launch whose estimate exceeds the device's memory (None: it fits, or
    --allow-oversubscribe was given)."""
    return plan_record(plan)["refusal"]
