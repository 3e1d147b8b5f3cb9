"""The training loss and its data-parallel mean: what the training loop, evaluation and the LR
finder all compute the same way."""
from __future__ import annotations

import torch


def model_inputs(batch, device) -> dict:
    """The model's inputs of a micro-batch. ``attention_mask`` (True = masked) is there only with
    --reset-attention-mask (each document attends to itself); otherwise the attention is causal."""
    mask = batch.get("attention_mask")
    return dict(input_ids=batch["tokens"].to(device, non_blocking=True),
                position_ids=batch["position_ids"].to(device, non_blocking=True),
                attention_mask=None if mask is None else mask.to(device, non_blocking=True))


def lm_loss(engine, batch, device) -> torch.Tensor:
    """Mean next-token cross entropy over the unmasked positions of a micro-batch."""
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True).float()
    # loss_mask also masks megatron-core's MTP losses (it defaults to all ones there)
    losses = engine(**model_inputs(batch, device), labels=labels, loss_mask=loss_mask)
    return (losses.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def dp_mean(value: torch.Tensor) -> float:
    """The mean of a scalar over the data-parallel ranks (one all-reduce and one host sync)."""
    from megatron.core import parallel_state as ps

    value = value.detach().float().clone()
    torch.distributed.all_reduce(value, group=ps.get_data_parallel_group())
    return value.item() / ps.get_data_parallel_world_size()
