"""The training loss and its data-parallel mean: what the training loop, evaluation and the LR
finder all compute the same way."""
from __future__ import annotations

import contextlib

import torch


def model_inputs(batch, device) -> dict:
    """The model's inputs of a micro-batch. ``attention_mask`` (True = masked) is there only with
    --reset-attention-mask (each document attends to itself); otherwise the attention is causal."""
    mask = batch.get("attention_mask")
    return dict(input_ids=batch["tokens"].to(device, non_blocking=True),
                position_ids=batch["position_ids"].to(device, non_blocking=True),
                attention_mask=None if mask is None else mask.to(device, non_blocking=True))


def loss_mask_of(batch, device) -> torch.Tensor:
    return batch["loss_mask"].to(device, non_blocking=True).float()


def masked_mean(losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-token losses over the unmasked positions."""
    return (losses.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def lm_losses(model, batch, device) -> torch.Tensor:
    """Per-token next-token cross entropy of a micro-batch (``model``: the DeepSpeed engine, or on a
    pipeline stage its module: a stage before the last returns its hidden states instead)."""
    labels = batch["labels"].to(device, non_blocking=True)
    # loss_mask also masks megatron-core's MTP losses (it defaults to all ones there)
    return model(**model_inputs(batch, device), labels=labels, loss_mask=loss_mask_of(batch, device))


def lm_loss(engine, batch, device) -> torch.Tensor:
    """Mean next-token cross entropy over the unmasked positions of a micro-batch."""
    return masked_mean(lm_losses(engine, batch, device), loss_mask_of(batch, device))


@contextlib.contextmanager
def captured_logits(model):
    """Keep the logits of the model's output layer (this rank's vocabulary shard, [s, b, v/tp]).

    A hook, not a forward without labels: the loss stays the model's own (bit-identical to training's
    ``lm_loss``), and megatron-core 0.16.1's GPTModel with MTP needs labels. Under MTP the output
    layer also runs on each MTP depth first; the main logits are its last call."""
    box = {}

    def keep(_module, _inputs, output):
        box["logits"] = output[0] if isinstance(output, tuple) else output

    if not model.post_process:  # a pipeline stage before the last: no logits here
        yield box
        return
    handle = model.output_layer.register_forward_hook(keep)
    try:
        yield box
    finally:
        handle.remove()


def dp_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over the data-parallel ranks, on every rank (one all-reduce). Under
    pipeline parallelism losses and counts live on the last stage: every rank gets its sum (the
    other stages' values do not count; one more all-reduce, over the pipeline group)."""
    from megatron.core import parallel_state as ps

    value = value.detach().clone()
    torch.distributed.all_reduce(value, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        if not ps.is_pipeline_last_stage():
            value.zero_()
        torch.distributed.all_reduce(value, group=ps.get_pipeline_model_parallel_group())
    return value


def dp_mean(value: torch.Tensor) -> float:
    """The mean of a scalar over the data-parallel ranks (``dp_sum``, one host sync)."""
    from megatron.core import parallel_state as ps

    return dp_sum(value.float()).item() / ps.get_data_parallel_world_size()
