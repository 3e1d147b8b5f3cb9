"""Pipeline parallelism (``--pipeline-model-parallel-size``): megatron-core's schedules drive the
micro-batches of an iteration through the stages, one DeepSpeed engine per stage does the rest
(docs/parallelism.md).

* ``schedule`` runs megatron-core's forward-backward function (1F1B over the stages; forward only
  for evaluation) on the stage's module, ``engine.module``: DeepSpeed's own forward would hook the
  outputs for a backward it starts itself, which the schedule replaces. Every stage reads the same
  micro-batches (the first uses the tokens, the last the labels and loss mask); the last computes
  the loss, which the schedule divides by the number of micro-batches (as DeepSpeed's accumulation
  does) and back-propagates through the stages; it also scales the MoE auxiliary and MTP losses.
* ``train_step``: the schedule, the word embedding's gradient summed over the stages holding it
  (``models.parallel.sum_replica_grads``), then ``engine.step()``. The DeepSpeed config has
  ``managed_gradient_accumulation: false``, so the step is the accumulation boundary: DeepSpeed
  reduces the gradients over the data-parallel group (ZeRO 0: all-reduce; ZeRO 1: to the
  partitions), clips with the global norm over every stage and steps.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from megatron_ext.models import parallel
from megatron_ext.training.loss import lm_losses, loss_mask_of, masked_mean

# forward(model, batch) -> output; loss(output, batch) -> (the loss to back-propagate, {name: value to keep})
Forward = Callable[[torch.nn.Module, dict], torch.Tensor]
Loss = Callable[[torch.Tensor, dict], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


def is_pipelined() -> bool:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size() > 1


def is_last_stage() -> bool:
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage()


def schedule(engine, batches: List[dict], forward: Forward, loss: Loss, forward_only: bool = False) -> List[dict]:
    """One pass of ``batches`` through the pipeline; on the last stage each micro-batch's kept values
    (``loss``'s dict), elsewhere an empty list."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = forward(model, batch)

        def loss_func(output_tensor):
            value, kept = loss(output_tensor, batch)
            return value, kept  # (the schedule divides ``value`` in place: ``kept`` holds copies)

        return output, loss_func

    tokens = batches[0]["tokens"]
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[engine.module],
        num_microbatches=len(batches), seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
        forward_only=forward_only)


def lm_loss_kept(device) -> Tuple[Forward, Loss]:
    """The training loss (``training/loss.py``) as the schedule's forward and loss."""

    def forward(model, batch):
        return lm_losses(model, batch, device)

    def loss(losses, batch):
        value = masked_mean(losses, loss_mask_of(batch, device))
        return value, {"lm loss": value.detach().clone()}

    return forward, loss


def train_step(engine, batches: List[dict], device) -> torch.Tensor:
    """One training iteration on this stage; returns the sum of the micro-batch losses on the last
    stage (zero elsewhere), on the device."""
    kept = schedule(engine, batches, *lm_loss_kept(device))
    parallel.sum_replica_grads(engine.module)
    engine.step()
    total = torch.zeros((), device=device)
    for record in kept:
        total += record["lm loss"]
    return total
