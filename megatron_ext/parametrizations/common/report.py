"""Measure what the built model's initialisation really is, family by family, next to what the
parametrization asked for (``megatron-ext init-report``, tests)."""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

_FAMILY_OF_SUFFIX = (
    ("word_embeddings.weight", "embedding"),
    ("position_embeddings.weight", "embedding"),
    ("linear_qkv.weight", "hidden"),
    ("linear_fc1.weight", "hidden"),
    ("linear_proj.weight", "output_projection"),
    ("linear_fc2.weight", "output_projection"),
    ("output_layer.weight", "output_layer"),
)


def family_of(name: str) -> str:
    for suffix, family in _FAMILY_OF_SUFFIX:
        if name.endswith(suffix):
            return family
    return ""


def measured_stds(model: torch.nn.Module) -> Dict[str, Tuple[int, float]]:
    """Family -> (number of tensors, pooled std of their values). Tensor-parallel shards are pooled
    over the tensor-parallel group so every rank reports the whole model."""
    from megatron.core import parallel_state as ps

    sums: Dict[str, List[float]] = {}
    for name, p in model.named_parameters():
        family = family_of(name)
        if family:
            x = p.detach().double()
            s = sums.setdefault(family, [0, 0.0, 0.0, 0.0])
            s[0] += 1
            s[1] += x.numel()
            s[2] += float(x.sum())
            s[3] += float((x * x).sum())
    families = sorted(sums)
    totals = torch.tensor([sums[f][1:] for f in families], dtype=torch.float64).reshape(-1, 3)
    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(totals, group=ps.get_tensor_model_parallel_group())
    out = {}
    for f, (n, total, squares) in zip(families, totals.tolist()):
        mean = total / n
        out[f] = (sums[f][0], math.sqrt(max(squares / n - mean * mean, 0.0)))
    return out


def init_report_rows(model, parametrization) -> List[Tuple[str, int, float, float]]:
    """(family, tensors, requested std, measured std) for every family the model has."""
    requested = parametrization.init_stds()
    measured = measured_stds(model)
    return [(f, measured[f][0], requested[f], measured[f][1]) for f in requested if f in measured]


def format_init_report(rows, parametrization) -> str:
    lines = [f"init report ({parametrization.summary()})",
             f"  {'family':<18} {'tensors':>7} {'requested std':>14} {'measured std':>13} {'ratio':>6}"]
    for family, count, want, got in rows:
        ratio = got / want if want else float("nan")
        lines.append(f"  {family:<18} {count:>7} {want:>14.5g} {got:>13.5g} {ratio:>6.3f}")
    return "\n".join(lines)
