"""What the fork's training loop does not do and our optimizers and LR finder need.

* ``curvature_pass``: SophiaG's Gauss-Newton-Bartlett refresh before an iteration (the hook
  protocol's ``curvature_pass_due`` / ``begin_curvature_pass`` / ``end_curvature_pass``). The
  iteration's micro-batches are drawn from the fork's data iterator, run through the fork's own
  ``forward_step`` with a model whose forward samples labels from its softmax, back-propagated and
  stepped by the DeepSpeed engine with clipping off and the LR schedule held; then the same
  micro-batches are handed to the fork's ``train_step``. Labels are drawn as our trainer draws
  them (seed, iteration and the micro-batch's place in the global batch). On DeepSpeed's pipeline
  engine (``GPTModelPipe``), which runs forward and backward only inside ``train_batch``, the
  pass is one ``train_batch`` of the same micro-batches with the pipe's loss function replaced
  by the sampled-label loss (on the last stage) and the LR schedule detached.
* ``run_lr_finder``: our LR range test in place of the fork's inline one: the fork's
  ``train_step`` runs each iteration, our ``LRFinder`` sets every group's LR (times its
  ``lr_mult``), records the data-parallel mean loss, stops on divergence and writes its results;
  no evaluation and no checkpoint.
"""
from __future__ import annotations

import itertools

import torch

from megatron_ext.megatron_deepspeed import project_api


class _SampledLabelModel:
    """Stands in for the engine inside the fork's ``forward_step``: the real forward without labels
    (logits), labels drawn from the model's own softmax, per-token cross entropy against them."""

    def __init__(self, engine, generator):
        self.engine = engine
        self.generator = generator
        self.training = True

    def __call__(self, tokens, position_ids, attention_mask, labels=None, **kwargs):
        output = self.engine(tokens, position_ids, attention_mask, **kwargs)
        logits, others = (output[0], output[1]) if isinstance(output, tuple) else (output, [])
        return project_api.sampled_label_losses(logits, self.generator), others


def _loss_tokens(items, fork) -> float:
    """Loss tokens of the global batch (``B`` of the estimator), from the fork's own loss mask."""
    from megatron.core import mpu

    args = fork["megatron.get_args"]()
    count = torch.zeros((), dtype=torch.float64)
    if items is not None:
        eod = fork["megatron.get_tokenizer"]().eod
        for item in items:
            tokens = item["text"][:, :-1].long()
            _, loss_mask, _ = fork["megatron.utils.get_ltor_masks_and_position_ids"](
                tokens, eod, args.reset_position_ids, args.reset_attention_mask, args.eod_mask_loss)
            count += loss_mask.double().sum()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    count = count.to(device)
    torch.distributed.all_reduce(count, group=mpu.get_data_parallel_group())
    torch.distributed.broadcast(count, mpu.get_tensor_model_parallel_src_rank(),
                                group=mpu.get_tensor_model_parallel_group())
    if mpu.get_pipeline_model_parallel_world_size() > 1:  # stages without a data iterator count 0
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX,
                                     group=mpu.get_pipeline_model_parallel_group())
    return float(count.item())


def curvature_pass(fork, session, forward_step_func, data_iterator, engine):
    """Run the curvature refresh on the next iteration's micro-batches; returns the iterator the
    fork's ``train_step`` must read (the same micro-batches first)."""
    from megatron.core import mpu

    args = fork["megatron.get_args"]()
    n = fork["megatron.get_num_microbatches"]()
    items = [next(data_iterator) for _ in range(n)] if data_iterator is not None else None
    optimizer = session.optimizer
    optimizer.begin_curvature_pass(_loss_tokens(items, fork))
    dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    device = next(engine.module.parameters()).device
    generators = (project_api.curvature_label_generator(device, args.seed, args.iteration, micro * dp_size + dp_rank)
                  for micro in range(n))
    replay = iter(items) if items is not None else None
    try:
        with project_api.gradient_clipping_disabled(engine):
            if _is_pipeline_engine(engine):
                _pipeline_curvature_pass(engine, replay, generators)
            else:
                for micro, gen in enumerate(generators):
                    engine.set_gradient_accumulation_boundary(micro == n - 1)
                    output, loss_func = forward_step_func(replay, _SampledLabelModel(engine, gen))
                    loss = loss_func(output)[0]
                    engine.backward(loss)
                engine.step(lr_kwargs={"increment": 0})  # the schedule holds: this is not a training step
    finally:
        optimizer.end_curvature_pass()
    return itertools.chain(items, data_iterator) if items is not None else None


def _is_pipeline_engine(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def _pipeline_curvature_pass(engine, micro_batches, generators) -> None:
    """The curvature pass as one ``train_batch`` of DeepSpeed's pipeline engine: the last stage's
    loss is the sampled-label loss (``GPTModelPipe``'s logits are [s, b, V]: transposed to [b, s, V]
    first, the layout the labels are drawn in without a pipeline; its MoE loss added, as its own
    loss function does), and the engine steps with no LR scheduler, so the schedule holds."""
    module = engine.module

    def sampled_label_loss(output, labels):
        losses = project_api.sampled_label_losses(output.transpose(0, 1), next(generators))
        mask = labels[1].reshape(-1).float()
        loss = torch.sum(losses.reshape(-1) * mask) / mask.sum()
        moe_loss = getattr(module, "moe_loss", None)
        return loss if moe_loss is None else loss + moe_loss

    loss_fn, scheduler = module.loss_fn, engine.lr_scheduler
    module.loss_fn, engine.lr_scheduler = sampled_label_loss, None
    try:
        engine.train_batch(data_iter=micro_batches)
    finally:
        module.loss_fn, engine.lr_scheduler = loss_fn, scheduler


def run_lr_finder(fork, session, train_step, forward_step_func, model, optimizer, opt_param_scheduler,
                  train_data_iterator) -> int:
    """Our LR range test with the fork's training steps; returns the iteration the run started at."""
    args = fork["megatron.get_args"]()
    engine = model[0]
    finder = session.finder
    start = args.iteration
    # the sweep starts here and the fork's run ends with it
    args.train_iters = finder.begin({"iteration": args.iteration, "consumed_samples": args.consumed_train_samples},
                                    engine.skipped_steps)
    session.scheduler.refresh()
    for module in model:
        module.train()
    config = fork["megatron.arguments.core_transformer_config_from_args"](args)
    config.timers = fork["megatron.get_timers"]()
    iteration = args.iteration
    while iteration < args.train_iters:
        lr = session.scheduler.current_lr
        loss_dict, skipped, _, _ = train_step(forward_step_func, train_data_iterator, model, optimizer,
                                              opt_param_scheduler, config)
        iteration += 1
        args.iteration = iteration
        args.consumed_train_samples += args.global_batch_size
        args.consumed_train_tokens += args.global_batch_size * args.seq_length
        loss = loss_dict.get("lm loss", next(iter(loss_dict.values()), float("nan"))) if loss_dict else float("nan")
        loss = float(loss.item() if torch.is_tensor(loss) else loss)
        if finder.record(lr, loss, engine.skipped_steps):
            break
    finder.finish()
    session.finder_ran = True
    args.do_valid = args.do_test = False  # a range test evaluates nothing after it either
    return start
