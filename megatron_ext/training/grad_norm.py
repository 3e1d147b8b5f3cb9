"""The global gradient norm of fp32 runs without ZeRO, where DeepSpeed clips the gradients itself
(``engine.clip_fp32_gradients``) and keeps no norm to log.

With the whole model on every rank (one pipeline stage, experts on every rank) DeepSpeed's
computation is right and the trainer only measures it for the log. When pipeline stages or
expert-parallel ranks hold different parameters it is not: it counts replicated parameters on
model-parallel rank 0 only (the first stage, once the model-parallel group spans the stages),
counts the last stage's copy of a tied embedding again, and averages the norm over the
data-parallel group, whose ranks hold different experts. ``global_grad_norm`` counts every
parameter once: replicated ones on tensor-parallel rank 0, pipeline replicas on the first stage,
experts summed over the ranks that hold them. ``GradNormKeeper`` clips with it there.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_ext.models import parallel


def global_grad_norm(model) -> torch.Tensor:
    """L2 norm of every gradient of the whole model (all stages, shards and experts), on every rank.
    Call it on reduced gradients (after DeepSpeed's data-parallel reduction)."""
    from megatron.core import parallel_state as ps

    replica = parallel.embedding_replica(model)
    tp_rank = ps.get_tensor_model_parallel_rank()
    device = next(model.parameters()).device
    dense, experts = torch.zeros((), device=device), torch.zeros((), device=device)
    for p in model.parameters():
        if p.grad is None or p is replica:
            continue
        if parallel.is_expert_parameter(p):
            experts += p.grad.detach().float().pow(2).sum()
        elif getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            dense += p.grad.detach().float().pow(2).sum()
    if ps.get_expert_model_parallel_world_size() > 1:  # experts on different ranks: summed over theirs
        torch.distributed.all_reduce(experts, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    else:  # every data-parallel rank holds every expert
        dense, experts = dense + experts, torch.zeros_like(experts)
    torch.distributed.all_reduce(dense, group=ps.get_model_parallel_group())  # tensor x pipeline
    return (dense + experts).sqrt()


class GradNormKeeper:
    """fp32 without ZeRO on a layout that splits the model: the engine clips with ``global_grad_norm``
    (its ``clip_fp32_gradients`` replaced on the instance; DeepSpeed calls it after the reduction,
    before the step) and the norm of every step is kept for the log, also without clipping (an
    optimizer step pre-hook measures it then)."""

    def __init__(self, engine):
        self.engine, self.model = engine, engine.module
        self.last: Optional[torch.Tensor] = None
        engine.clip_fp32_gradients = self._clip
        engine.optimizer.register_step_pre_hook(self._measure_unclipped)

    def _clip(self) -> None:
        norm = self.last = global_grad_norm(self.model)
        coefficient = torch.clamp(self.engine.gradient_clipping() / (norm + 1e-6), max=1.0)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(coefficient)

    def _measure_unclipped(self, optimizer, args, kwargs) -> None:
        if self.engine.gradient_clipping() == 0.0:
            self.last = global_grad_norm(self.model)
