"""Coordinate check (Tensor Programs V, section 9.2): train a few steps at several widths (or
depths) and watch the typical size of each layer's activations. Under a parametrization that
transfers they stay flat as the model grows; under SP with a fixed LR they grow with width.

Pass/fail: for every recorded activation, the slope of log(size) against log(width) (or depth)
after the last step must stay below ``threshold`` in absolute value.

Runs the real megatron-core model with the trainer's parametrization, param groups, optimizer and
LR scheduler, in one process without DeepSpeed (an engine per width would only add start-up time).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Sequence

import torch

DEFAULT_WIDTHS = (64, 128, 256, 512)
DEFAULT_DEPTHS = (2, 4, 8, 16)


@dataclasses.dataclass
class CoordCheckResult:
    axis: str  # "width" or "depth"
    sizes: List[int]
    # activation name -> per size -> per step: mean |x|
    activations: Dict[str, List[List[float]]]
    slopes: Dict[str, float]  # at the last step
    threshold: float

    @property
    def worst(self) -> str:
        return max(self.slopes, key=lambda k: abs(self.slopes[k]))

    @property
    def passed(self) -> bool:
        return all(abs(s) < self.threshold for s in self.slopes.values())

    def as_dict(self) -> dict:
        return dict(axis=self.axis, sizes=self.sizes, activations=self.activations, slopes=self.slopes,
                    threshold=self.threshold, passed=self.passed, worst=self.worst)


def log_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-30)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def _record(model, store: Dict[str, float]):
    """Forward hooks writing mean |x| of the embedding output, every layer's output and the logits."""

    def hook(name):
        def fn(module, inputs, output):
            x = output[0] if isinstance(output, tuple) else output
            store[name] = float(x.detach().float().abs().mean())

        return fn

    layers = model.decoder.layers
    handles = [model.embedding.register_forward_hook(hook("embedding"))]
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook(f"layer{i + 1}" if i + 1 < len(layers) else "last_layer")))
    handles.append(model.output_layer.register_forward_hook(hook("logits")))
    return handles


def _one_run(argv: List[str], steps: int, batch: int, seed: int) -> Dict[str, List[float]]:
    """Mean |activation| per recorded module, at each of ``steps`` training steps."""
    from megatron_ext.plan import parse_args
    from megatron_ext.models.gpt import build_model
    from megatron_ext.optimizers import build_optimizer
    from megatron_ext.parametrizations import parametrization_for
    from megatron_ext.schedules.common.scheduler import ParamScheduler
    from megatron_ext.training.trainer import set_seeds

    args = parse_args(argv, world_size=1)
    set_seeds(seed)
    parametrization = parametrization_for(args)
    vocab = 512
    model = build_model(args, vocab, parametrization)
    optimizer = build_optimizer(model, args, parametrization)
    scheduler = ParamScheduler.from_args(optimizer, args)
    store: Dict[str, float] = {}
    handles = _record(model, store)
    # One fixed batch, the same at every size and step: the update then meets the inputs it was
    # computed from, the regime muP's analysis describes; fresh random batches at these small
    # widths mostly measure how many unrelated tokens a batch holds.
    data = torch.Generator().manual_seed(seed)
    series: Dict[str, List[float]] = {}
    positions = torch.arange(args.seq_length).unsqueeze(0).expand(batch, -1)
    for step in range(steps):
        scheduler.step(step * batch)
        if step == 0:
            tokens = torch.randint(0, vocab, (batch, args.seq_length + 1), generator=data)
        losses = model(input_ids=tokens[:, :-1], position_ids=positions, attention_mask=None, labels=tokens[:, 1:])
        for name, value in store.items():
            series.setdefault(name, []).append(value)
        optimizer.zero_grad(set_to_none=True)
        losses.float().mean().backward()
        optimizer.step()
    for h in handles:
        h.remove()
    return series


def coord_check(base_argv: List[str], axis: str, sizes: Sequence[int], *, parametrization: str, steps: int = 5,
                batch: int = 4, heads: int = 4, seed: int = 1234, threshold: float = 0.25) -> CoordCheckResult:
    """Run the check along ``axis`` ("width": --hidden-size; "depth": --num-layers). The smallest
    size is the base shape of mup/completep."""
    sizes = sorted(sizes)
    activations: Dict[str, List[List[float]]] = {}
    for size in sizes:
        argv = list(base_argv) + ["--parametrization", parametrization, "--lr-decay-style", "constant",
                                  "--lr-warmup-iters", "0", "--num-attention-heads", str(heads)]
        if axis == "width":
            argv += ["--hidden-size", str(size), "--ffn-hidden-size", str(4 * size)]
            if parametrization in ("mup", "completep"):
                argv += ["--mup-base-hidden", str(sizes[0])]
        else:
            argv += ["--num-layers", str(size)]
            if parametrization == "completep":
                argv += ["--depth-base", str(sizes[0])]
        for name, values in _one_run(argv, steps, batch, seed).items():
            activations.setdefault(name, []).append(values)
    if axis == "depth":  # the layers in between differ from depth to depth
        activations = {k: v for k, v in activations.items() if k in ("embedding", "last_layer", "logits")}
    slopes = {name: log_slope(sizes, [per_size[-1] for per_size in values])
              for name, values in activations.items() if values and len(values) == len(sizes)}
    return CoordCheckResult(axis, list(sizes), activations, slopes, threshold)

