"""The trainer's flags of the memory plan (the start-up block, the launcher's dry run and the
refusal of a launch that cannot fit)."""
from __future__ import annotations

from megatron_ext.argtypes import fraction, positive_float


def add_plan_arguments(g) -> None:
    g.add_argument("--device-memory", type=positive_float, default=None, metavar="GIB",
                   help="memory per device to plan against, in GiB (default: what the device reports; on the CPU "
                        "the host's memory shared by the ranks on it)")
    g.add_argument("--allow-oversubscribe", action="store_true",
                   help="start even when the memory plan's estimate exceeds the device's memory (docs/memory_plan.md)")
    g.add_argument("--mfu", type=fraction, default=None,
                   help="model FLOPs utilisation assumed for the plan's step time (default: the device's in the peak "
                        "table, e.g. 0.40 for an H100)")
    g.add_argument("--peak-tflops", type=positive_float, default=None,
                   help="dense bf16 peak of the device in TFLOPS, for the plan's step time (default: the peak table's)")
