"""The plan as people and programs read it: rows for the start-up block and ``DRY_RUN=1``, the
``megatron-ext plan`` table, the ``--json`` record and the ``--plot`` stacked bars; and the one-line
refusal of a launch that cannot fit."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_ext.planning.devices import Device
from megatron_ext.planning.memory import GiB, MemoryPlan, Setup, _fmt
from megatron_ext.planning.throughput import StepTime
from megatron_ext.planning import devices
from megatron_ext.planning.memory import estimate, setup_from_plan
from megatron_ext.planning.throughput import step_time

# A layout is taken to fit when its peak leaves this share of the device free: the allocator's
# fragmentation and the runtime (CUDA context, NCCL buffers) take memory the estimate does not count.
HEADROOM = 0.10


@dataclasses.dataclass(frozen=True)
class Assessment:
    """One layout's memory and time on one device."""

    setup: Setup
    memory: MemoryPlan
    time: StepTime
    device: Device
    device_memory: float  # bytes (the device's, or --device-memory)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.device_memory * (1 - HEADROOM)

    @property
    def exceeds(self) -> bool:
        return self.memory.total > self.device_memory


def fix_for(a: Assessment) -> str:
    """What would make the largest term smaller (the refusal's advice)."""
    s, key = a.setup, a.memory.largest.key
    lay = s.layout
    if key == "activations" or key == "transient":
        if not s.args.recompute_activations:
            return "--recompute-activations, a smaller --micro-batch-size, or more --tensor-model-parallel-size"
        return "a smaller --micro-batch-size or more --tensor-model-parallel-size"
    if key in ("states", "master", "gradients", "workspace"):
        if s.zero_stage < 3:
            nxt = s.zero_stage + 1
            return f"--zero-stage {nxt} (partitions them over the data-parallel ranks), --cpu-optimizer, or more " \
                   "data-parallel ranks"
        return "--cpu-optimizer (ZeRO-Offload), or more data-parallel ranks or --tensor-model-parallel-size"
    if key == "buffers":
        return "a smaller reduce_bucket_size in the DeepSpeed config"
    if key in ("weights", "gathered"):
        return "--zero-stage 3, or more --tensor-model-parallel-size" + (
            "" if lay.pp > 1 else " (or pipeline parallelism where it runs)")
    return "a larger device or more ranks"


def refusal(a: Assessment) -> str:
    """The one line that refuses a launch that cannot fit."""
    m = a.memory
    largest = m.largest
    return (f"the estimated peak memory {_fmt(m.total)} per device (rank of pipeline stage {m.stage}, {m.phase}) "
            f"exceeds the device's {_fmt(a.device_memory)}; the largest term is {largest.label} "
            f"{_fmt(largest.bytes)}: try {fix_for(a)} (--allow-oversubscribe runs it anyway; "
            f"megatron-ext plan shows every term)")


# ---------------------------------------------------------------------------------------------
# Rows (start-up block, DRY_RUN)
# ---------------------------------------------------------------------------------------------

def rows(a: Assessment) -> List[Tuple[str, Any]]:
    m, t = a.memory, a.time
    verdict = "fits" if a.fits else ("DOES NOT FIT" if a.exceeds else f"tight (under {HEADROOM:.0%} free)")
    out = [("memory/device (est.)", f"{_fmt(m.total)} of {_fmt(a.device_memory)} ({verdict}); peak at "
                                        f"{m.phase}" + (f", pipeline stage {m.stage}" if a.setup.layout.pp > 1 else ""))]
    for term in m.terms:  # (keys no wider than the start-up block's own: its layout stays)
        out.append((f"  {term.key}", f"{_fmt(term.bytes)}  {term.label}"))
    if m.host_bytes:
        out.append(("  host (offload)", _fmt(m.host_bytes)))
    out += time_rows(t, a.device)
    return out


def time_rows(t: StepTime, device: Device) -> List[Tuple[str, Any]]:
    if t.seconds is None:
        return [("step time (est.)", f"unknown: no dense bf16 peak for {device.name} (give --peak-tflops and --mfu)")]
    factors = f", {t.factors}" if t.factors else ""
    rows = [("step time (est.)", f"{t.seconds:.3g} s ({t.flops / 1e12:,.1f} TFLOPs at {t.utilisation:.0%} of "
                                 f"{t.peak_tflops:g} TFLOPS{factors})"),
            ("tokens/s (est.)", f"{t.tokens_per_second:,.0f} ({t.tokens_per_day / 1e9:,.2f}B per day)")]
    if t.run_hours is not None:
        rows.append(("whole run (est.)", f"{t.run_hours:,.1f} h on {t.nodes:g} node(s) = {t.node_hours:,.0f} node-hours "
                                         f"({t.train_iters:,} iterations)"))
    return rows


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------

def as_json(a: Assessment) -> Dict[str, Any]:
    s, m, t = a.setup, a.memory, a.time
    lay = s.layout
    return {
        "layout": {"tp": lay.tp, "pp": lay.pp, "ep": lay.ep, "sp": lay.sp, "dp": lay.dp, "world_size": lay.world},
        "zero_stage": s.zero_stage, "precision": s.precision, "cpu_offload": s.cpu_offload,
        "micro_batch": s.micro_batch, "gradient_accumulation": s.accumulation,
        "recompute": bool(s.args.recompute_activations), "optimizer": getattr(s.optimizer, "name", None),
        "device": {"name": a.device.name, "memory_bytes": a.device_memory, "peak_tflops": t.peak_tflops},
        "memory": {"peak_bytes": m.total, "phase": m.phase, "pipeline_stage": m.stage,
                   "terms": [{"key": x.key, "label": x.label, "bytes": x.bytes, "formula": x.formula} for x in m.terms],
                   "phases": {name: b for name, b in m.phases}, "host_bytes": m.host_bytes,
                   "largest": m.largest.key},
        "fits": a.fits, "exceeds_device": a.exceeds,
        "parameters": m.parameters, "rank_parameters": m.rank_parameters,
        "time": {"flops_per_iteration": t.flops, "step_seconds": t.seconds, "tokens_per_second": t.tokens_per_second,
                 "tokens_per_day": t.tokens_per_day, "train_iters": t.train_iters, "nodes": t.nodes,
                 "node_hours": t.node_hours, "utilisation": t.utilisation, "factors": t.factors},
        "notes": list(m.notes),
        "refusal": refusal(a) if a.exceeds and not getattr(s.args, "allow_oversubscribe", False) else None,
    }


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------

def plot(assessments: Sequence[Assessment], labels: Sequence[str], path: str, plt) -> None:
    """Stacked bars of each layout's peak by term (GiB), the device's memory as a line."""
    keys: List[str] = []
    for a in assessments:
        for t in a.memory.terms:
            if t.key not in keys:
                keys.append(t.key)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(assessments) + 3), 5))
    bottoms = [0.0] * len(assessments)
    for key in keys:
        values = [a.memory.term(key) / GiB for a in assessments]
        ax.bar(range(len(assessments)), values, bottom=bottoms, label=key)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    memory = max(a.device_memory for a in assessments) / GiB
    ax.axhline(memory, color="black", linestyle="--", linewidth=1, label=f"device memory ({memory:.0f} GiB)")
    ax.set_xticks(range(len(assessments)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GiB per device (most loaded rank, at its peak)")
    ax.set_title("memory plan")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def local_ranks(world: int) -> int:
    """Ranks sharing this host (they share its memory when the device is the CPU)."""
    for var in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "PALS_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return max(1, int(value))
    return world  # a launcher starting the ranks of one host


def assess(plan, device: Optional[Device] = None, device_memory: Optional[float] = None,
           mfu: Optional[float] = None, peak_tflops: Optional[float] = None) -> Assessment:
    """A run plan on ``device`` (default: this process's, detected), as it is laid out."""

    here = device is None
    device = device or devices.detect()
    setup = setup_from_plan(plan, device.kind, here=here)
    memory = device_memory if device_memory is not None else device.memory
    if here and device.kind == "cpu" and device_memory is None:
        memory = device.memory / local_ranks(plan.world_size)
    return Assessment(setup, estimate(setup), step_time(setup, device, plan.args.train_iters, mfu, peak_tflops),
                      device, memory)
