"""The trainer's flags of the memory plan (the start-up block, the launcher's dry run and the
refusal of a launch that cannot fit)."""
from __future__ import annotations

from megatron_ext.argtypes import fraction, positive_float
from megatron_ext.registry import Arg

PLAN_ARGS = (
    Arg("--device-memory", type=positive_float, default=None, metavar="GIB",
        help="memory per device to plan against, in GiB (default: what the device reports; on the CPU the host's "
             "memory shared by the ranks on it)"),
    Arg("--allow-oversubscribe", action="store_true",
        help="start even when the memory plan's estimate exceeds the device's memory (docs/memory_plan.md)"),
    Arg("--mfu", type=fraction, default=None,
        help="model FLOPs utilisation assumed for the plan's step time (default: the device's in the peak table, "
             "e.g. 0.40 for an H100)"),
    Arg("--peak-tflops", type=positive_float, default=None,
        help="dense bf16 peak of the device in TFLOPS, for the plan's step time (default: the peak table's)"),
)


def add_plan_arguments(group) -> None:
    for arg in PLAN_ARGS:
        group.add_argument(*arg.flags, **arg.kwargs)
