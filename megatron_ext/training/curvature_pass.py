"""The curvature pass of optimizers that keep a curvature estimate (the hook protocol in
``optimizers/common/hooks.py``: ``curvature_pass_due``, ``begin_curvature_pass``,
``end_curvature_pass``), run by the trainer before an iteration when the optimizer asks for it."""
from __future__ import annotations

from typing import List

import torch

from megatron_ext.optimizers.common.hooks import (curvature_label_generator, gradient_clipping_disabled,
                                                  sampled_label_losses)
from megatron_ext.models import parallel
from megatron_ext.training import pipeline
from megatron_ext.training.loss import captured_logits, lm_losses


def logits_forward(model, module, batch, device, kept: list) -> torch.Tensor:
    """The model's forward with its labels (megatron-core's MTP needs them), keeping the main logits
    (``[s, b, v/tp]``; on the last pipeline stage) in ``kept``; returns the forward's output."""
    with captured_logits(module) as out:
        output = lm_losses(model, batch, device)
    if "logits" in out:
        kept.append(out["logits"])
    return output


def sampled_label_loss(logits: torch.Tensor, batch, device, generator: torch.Generator) -> torch.Tensor:
    """Mean cross entropy of the model's logits (``[s, b, v/tp]``) against labels sampled from its
    own softmax, over the unmasked positions of a micro-batch (the loss of the Gauss-Newton-Bartlett
    estimator)."""
    loss_mask = batch["loss_mask"].to(device, non_blocking=True).float()
    losses = sampled_label_losses(logits.transpose(0, 1), generator)
    return (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def curvature_pass(engine, optimizer, batches: List[dict], device, seed: int, iteration: int) -> None:
    """One curvature refresh on the micro-batches of an iteration: every micro-batch forward, labels
    sampled from the model's own softmax, the loss on them back-propagated through the DeepSpeed
    engine (its data-parallel reduction, ZeRO partitioning and loss scaling) and ``engine.step()``
    with clipping off; between begin and end the optimizer updates only its curvature estimate."""
    from megatron.core import parallel_state as ps

    count = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        count += batch["loss_mask"].to(device).double().sum()
    torch.distributed.all_reduce(count, group=ps.get_data_parallel_group())
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    optimizer.begin_curvature_pass(float(count.item()))
    try:
        with gradient_clipping_disabled(engine):
            if pipeline.is_pipelined():
                _pipelined_pass(engine, batches, device, seed, iteration)
                return
            for micro, batch in enumerate(batches):
                gen = curvature_label_generator(device, seed, iteration, micro * dp_size + dp_rank)
                kept = []
                logits_forward(engine, engine.module, batch, device, kept)
                engine.backward(sampled_label_loss(kept[0], batch, device, gen))
                engine.step()
    finally:
        optimizer.end_curvature_pass()


def _pipelined_pass(engine, batches: List[dict], device, seed: int, iteration: int) -> None:
    """The same pass through megatron-core's schedule (``training/pipeline.py``): the last stage
    samples each micro-batch's labels (micro-batches reach it in order) and the schedule's mean over
    the micro-batches is the accumulation's."""
    from megatron.core import parallel_state as ps

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    kept, reached = [], []

    def loss(_output, batch):
        gen = curvature_label_generator(device, seed, iteration, len(reached) * dp_size + dp_rank)
        reached.append(batch)
        return sampled_label_loss(kept.pop(0), batch, device, gen), {}

    pipeline.schedule(engine, batches, lambda model, batch: logits_forward(model, model, batch, device, kept), loss)
    parallel.sum_replica_grads(engine.module)
    engine.step()
