"""The training loss and its data-parallel mean: what the training loop, evaluation and the LR
finder all compute the same way."""
from __future__ import annotations

import torch


def lm_loss(engine, batch, device) -> torch.Tensor:
    """Mean next-token cross entropy over the unmasked positions of a micro-batch."""
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True).float()
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    # loss_mask also masks megatron-core's MTP losses (it defaults to all ones there)
    losses = engine(input_ids=tokens, position_ids=position_ids, attention_mask=None, labels=labels,
                    loss_mask=loss_mask)
    return (losses.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def dp_mean(value: torch.Tensor) -> float:
    """The mean of a scalar over the data-parallel ranks (one all-reduce and one host sync)."""
    from megatron.core import parallel_state as ps

    value = value.detach().float().clone()
    torch.distributed.all_reduce(value, group=ps.get_data_parallel_group())
    return value.item() / ps.get_data_parallel_world_size()
