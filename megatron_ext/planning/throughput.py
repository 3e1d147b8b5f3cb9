"""Step time, tokens per second and per day, and the whole run in node-hours, from the model's
FLOPs at an assumed utilisation of the device's dense bf16 peak.

FLOPs per iteration are the trainer's own count (``training.trainer.flops_per_iteration``: 6 per
active parameter per token plus the attention scores and values, what its TFLOPs log reports).
The assumed utilisation (``--mfu``, per device in ``devices.DEVICES``) is that of a run without
recomputation; the estimate then adds what the layout costs (docs/memory_plan.md):

* full recomputation runs each layer's forward again: its layers' FLOPs x 8/6;
* the pipeline bubble of 1F1B: (m + PP - 1) / m for m micro-batches per step;
* tensor parallelism's all-reduces: 4% per doubling inside a node, x0.5 across nodes;
* ZeRO 3 gathers the weights in forward and backward: x0.9.
These factors are assumptions, stated so they can be replaced; the memory estimate is measured.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from megatron_ext.planning import features as F
from megatron_ext.training.trainer import flops_per_iteration


@dataclasses.dataclass(frozen=True)
class StepTime:
    flops: float  # model FLOPs of one iteration
    seconds: Optional[float]  # None when the device's peak is unknown
    tokens_per_second: Optional[float]
    utilisation: float  # assumed, before the layout's factors
    factors: str  # the layout's factors, spelled out
    peak_tflops: Optional[float]
    train_iters: int
    nodes: float

    @property
    def tokens_per_day(self) -> Optional[float]:
        return None if self.tokens_per_second is None else self.tokens_per_second * 86400

    @property
    def run_hours(self) -> Optional[float]:
        return None if self.seconds is None else self.seconds * self.train_iters / 3600

    @property
    def node_hours(self) -> Optional[float]:
        return None if self.run_hours is None else self.run_hours * self.nodes


def active_parameters(args, vocab: int) -> int:
    """Parameters a token passes through: all but the routed experts it is not sent to."""
    total, experts = 0, 0
    for p in F.parameters(args, vocab):
        total += p.numel * p.count
        experts += p.numel * p.count if p.expert else 0
    if not experts:
        return total
    return int(total - experts * (1 - args.moe_router_topk / args.num_experts))


def step_time(setup, device, train_iters: int, mfu: Optional[float] = None,
              peak_tflops: Optional[float] = None) -> StepTime:
    """``setup``: the memory estimate's ``Setup``; ``device``: a ``devices.Device``."""

    a, lay = setup.args, setup.layout
    global_batch = setup.micro_batch * setup.accumulation * lay.dp
    flops = flops_per_iteration(_with_batch(a, global_batch), active_parameters(a, setup.vocab))
    peak = peak_tflops if peak_tflops is not None else device.peak_tflops
    utilisation = mfu if mfu is not None else device.mfu
    factors, hardware = [], flops
    if a.recompute_activations:
        layer_share = 1 - 6 * setup.vocab * a.hidden_size * a.seq_length * global_batch / flops
        hardware = flops * (1 + layer_share * 2 / 6)
        factors.append("recompute x%.2f" % (hardware / flops))
    efficiency = 1.0
    if lay.pp > 1:
        bubble = (setup.accumulation + lay.pp - 1) / setup.accumulation
        efficiency /= bubble
        factors.append(f"bubble x{bubble:.2f}")
    if lay.tp > 1:
        tp = (1 - 0.04 * math.log2(lay.tp)) * (0.5 if lay.tp > device.per_node else 1.0)
        efficiency *= tp
        factors.append(f"TP x{1 / tp:.2f}")
    if setup.zero_stage == 3:
        efficiency *= 0.9
        factors.append("ZeRO 3 x1.11")
    nodes = lay.world / max(1, device.per_node)
    if not peak or not utilisation:
        return StepTime(flops, None, None, utilisation, ", ".join(factors), peak, train_iters, nodes)
    seconds = hardware / (lay.world * peak * 1e12 * utilisation * efficiency)
    return StepTime(flops, seconds, global_batch * a.seq_length / seconds, utilisation, ", ".join(factors), peak,
                    train_iters, nodes)


def _with_batch(args, global_batch: int):
    """The flags with another global batch (the search's layouts), for the trainer's FLOPs count."""
    import argparse

    return argparse.Namespace(**{**vars(args), "global_batch_size": global_batch})
