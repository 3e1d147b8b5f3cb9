"""Accelerators the plan knows: memory, dense bf16 peak and devices per node, per device as one
rank sees it (a tile of an Intel Max 1550, a GCD of an MI250X). Sources in docs/memory_plan.md.
Memory is what the runtime reports as the device's total (torch's ``total_memory``: an "80 GB"
H100 reports 79.2 GiB), not the marketed size.

``detect()`` names this process's device (through ``platform.accelerator``); ``lookup(name)`` reads
the table (``--device``); a device not in the table plans memory but no time unless
``--peak-tflops`` is given.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Optional
from megatron_ext.platform.accelerator import accelerator_name, device_model, total_memory

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    kind: str  # cuda | xpu | cpu: which kernels the model runs (attention, optimizer updates)
    memory: float  # bytes per device
    peak_tflops: Optional[float]  # dense bf16 tensor throughput per device (None: unknown)
    per_node: int  # devices (ranks) per node
    mfu: float  # the model FLOPs utilisation assumed for step times (override: --mfu)
    description: str = ""


# Dense (no sparsity) bf16 tensor peaks, vendor figures (sources: docs/memory_plan.md).
DEVICES = {
    "a100": Device("a100", "cuda", 39.6 * GiB, 312.0, 4, 0.45, "NVIDIA A100 SXM4 40 GB (Polaris: 4 per node)"),
    "a100-80gb": Device("a100-80gb", "cuda", 79.2 * GiB, 312.0, 8, 0.45, "NVIDIA A100 SXM4 80 GB"),
    "h100": Device("h100", "cuda", 79.2 * GiB, 989.0, 8, 0.40, "NVIDIA H100 SXM5 80 GB"),
    "h100-pcie": Device("h100-pcie", "cuda", 79.2 * GiB, 756.0, 8, 0.40, "NVIDIA H100 PCIe 80 GB"),
    "h100-nvl": Device("h100-nvl", "cuda", 87.4 * GiB, 835.0, 8, 0.40, "NVIDIA H100 NVL 94 GB"),
    "h200": Device("h200", "cuda", 139.8 * GiB, 989.0, 8, 0.40, "NVIDIA H200 SXM 141 GB"),
    "gh200": Device("gh200", "cuda", 94.5 * GiB, 989.0, 4, 0.40, "NVIDIA GH200 96 GB"),
    "mi250x": Device("mi250x", "cuda", 64 * GiB, 191.5, 8, 0.30,
                     "AMD Instinct MI250X, one GCD (half a module; Frontier: 8 per node)"),
    "mi250": Device("mi250", "cuda", 64 * GiB, 181.0, 8, 0.30, "AMD Instinct MI250, one GCD"),
    "mi300x": Device("mi300x", "cuda", 192 * GiB, 1307.4, 8, 0.30, "AMD Instinct MI300X 192 GB"),
    "mi300a": Device("mi300a", "cuda", 128 * GiB, 980.6, 4, 0.30, "AMD Instinct MI300A 128 GB"),
    "max1550-tile": Device("max1550-tile", "xpu", 64 * GiB, 419.4, 12, 0.30,
                           "Intel Data Center GPU Max 1550, one tile (Aurora: 6 GPUs = 12 tiles per node)"),
    "max1100": Device("max1100", "xpu", 48 * GiB, 352.0, 8, 0.30, "Intel Data Center GPU Max 1100"),
}
ALIASES = {"aurora-tile": "max1550-tile", "aurora": "max1550-tile", "pvc-tile": "max1550-tile",
           "max1550": "max1550-tile", "polaris": "a100", "a100-40gb": "a100", "h100-sxm": "h100",
           "frontier": "mi250x", "mi250x-gcd": "mi250x"}


class UnknownDevice(ValueError):
    pass


def lookup(name: str) -> Device:
    key = name.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key in DEVICES:
        return DEVICES[key]
    known = sorted(DEVICES) + sorted(ALIASES)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UnknownDevice(f"unknown device '{name}'{hint}; known: {', '.join(sorted(DEVICES))} "
                        f"(and {', '.join(sorted(ALIASES))})")


# The device model name torch reports -> the table; first match wins ("h100 nvl" before "h100").
_MODEL_PATTERNS = (
    (r"gh200", "gh200"), (r"h200", "h200"), (r"h100 nvl", "h100-nvl"), (r"h100 pcie", "h100-pcie"), (r"h100", "h100"),
    (r"a100.*80", "a100-80gb"), (r"a100", "a100"), (r"mi300x", "mi300x"), (r"mi300a", "mi300a"), (r"mi250x", "mi250x"),
    (r"mi250", "mi250"), (r"max 1550|max1550", "max1550-tile"), (r"max 1100|max1100", "max1100"),
)


def for_model(name: str) -> Optional[Device]:
    """The table's device for a model name as torch reports it ('NVIDIA H100 80GB HBM3'), or None."""
    for pattern, key in _MODEL_PATTERNS:
        if re.search(pattern, name or "", re.IGNORECASE):
            return DEVICES[key]
    return None


def detect() -> Device:
    """This process's device: the table's entry for its model (with the memory the device
    reports), or an entry of its own (no peak) for a device the table lacks or a CPU."""

    kind = accelerator_name()
    memory = float(total_memory())
    model = device_model()
    known = for_model(model)
    if known is not None:
        return dataclasses.replace(known, memory=memory, description=f"{model} (detected)")
    if kind == "cpu":
        return Device("cpu", "cpu", memory, None, 1, 0.0, f"CPU, {memory / GiB:.0f} GiB host memory (detected)")
    return Device(kind, kind if kind in ("cuda", "xpu") else "cuda", memory, None, 1, 0.0,
                  f"{model or kind} (detected; not in the peak table)")
