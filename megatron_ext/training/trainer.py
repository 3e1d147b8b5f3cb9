"""``pretrain(args)``: the training loop. A DeepSpeed engine (ZeRO 0-3, accumulation, clipping,
precision) around a megatron-core GPTModel; optimizer, LR schedule and parametrization come from
the registries only."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from typing import List, Optional

import numpy as np
import torch

from megatron_ext.training.metrics import MetricsWriter, format_log_line, print_rank0, startup_table


@dataclasses.dataclass
class TrainResult:
    iterations: int
    consumed_samples: int
    train_losses: List[float]  # one per logged iteration
    valid_losses: List[float]  # one per evaluation
    last_checkpoint: Optional[str]
    tokens_per_second: float


def set_seeds(seed: int) -> None:
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _dp_mean(value: torch.Tensor) -> float:
    from megatron.core import parallel_state as ps

    value = value.detach().float().clone()
    torch.distributed.all_reduce(value, group=ps.get_data_parallel_group())
    return value.item() / ps.get_data_parallel_world_size()


def lm_loss(engine, batch, device) -> torch.Tensor:
    """Mean next-token cross entropy over the unmasked positions of a micro-batch."""
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True).float()
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    losses = engine(input_ids=tokens, position_ids=position_ids, attention_mask=None, labels=labels)
    return (losses.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def evaluate(engine, dataset, args, device) -> Optional[float]:
    from megatron_ext.data.gpt_data import make_loader

    if dataset is None or args.eval_iters == 0:
        return None
    from megatron_ext.optimizers import hooks as optimizer_hooks

    engine.eval()
    total, count = torch.zeros((), device=device), 0
    # The optimizer's evaluation weights (schedule-free: the average x) while evaluating.
    with torch.no_grad(), optimizer_hooks.evaluation_weights(engine.basic_optimizer, engine):
        for batch in make_loader(dataset, args, consumed=0, total=args.eval_iters * args.global_batch_size):
            total += lm_loss(engine, batch, device)
            count += 1
    engine.train()
    return _dp_mean(total / max(count, 1))


def flops_per_iteration(args, num_params: int) -> float:
    """Training FLOPs of one iteration: 6 per parameter per token plus attention scores."""
    tokens = args.global_batch_size * args.seq_length
    attention = 12 * args.num_layers * args.hidden_size * args.seq_length
    return tokens * (6 * num_params + attention)


def pretrain(args) -> TrainResult:
    """Train with already-parsed ``args`` (see ``megatron_ext.arguments.parse_args``)."""
    import deepspeed
    from deepspeed.runtime.utils import clip_grad_norm_
    from megatron.core import parallel_state as ps

    from megatron_ext.data.gpt_data import build_datasets, data_sources, make_loader, tokenizer_for
    from megatron_ext.model import build_model, count_parameters
    from megatron_ext.optimizers import OPTIMIZERS
    from megatron_ext.optimizers import hooks as optimizer_hooks
    from megatron_ext.optimizers.param_groups import build_param_groups
    from megatron_ext.parametrizations import PARAMETRIZATIONS
    from megatron_ext.platform import accelerator, init_distributed
    from megatron_ext.schedules.scheduler import ParamScheduler
    from megatron_ext.training import checkpointing
    from megatron_ext.training.deepspeed_config import build_deepspeed_config
    from megatron_ext.training.mpu import MegatronCoreMPU

    dist = init_distributed(args.distributed_backend)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size)
    device = accelerator.device(dist.local_rank)
    set_seeds(args.seed)

    sources = data_sources(args)
    tokenizer = tokenizer_for(args, sources)
    args.vocab_size_unpadded = tokenizer.vocab_size
    train_ds, valid_ds, test_ds = build_datasets(args, tokenizer, sources)

    parametrization = PARAMETRIZATIONS.get(args.parametrization).obj(args)
    model = build_model(args, tokenizer.vocab_size, parametrization)
    num_params = count_parameters(model)
    groups = build_param_groups(model, parametrization.group_options)
    optimizer = OPTIMIZERS.get(args.optimizer).obj(groups, args)
    ds_config = build_deepspeed_config(args)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=MegatronCoreMPU)
    optimizer_hooks.engine_ready(optimizer, engine)  # optimizer hook protocol: megatron_ext/optimizers/hooks.py
    scheduler = ParamScheduler.from_args(optimizer, args)

    start = {"iteration": 0, "consumed_samples": 0, "path": None}
    if args.load:
        start = checkpointing.load_checkpoint(engine, args, scheduler)
    iteration, consumed = start["iteration"], start["consumed_samples"]
    optimizer_hooks.train_mode(optimizer, engine)  # checkpoints are saved with the evaluation weights

    metrics = MetricsWriter(args)
    train_losses, valid_losses = [], []
    print_rank0(startup_table(args, num_params, start))
    if args.save and torch.distributed.get_rank() == 0:
        os.makedirs(args.save, exist_ok=True)
        with open(os.path.join(args.save, "ds_config.json"), "w") as f:
            json.dump(ds_config, f, indent=2)

    if args.eval_at_start and iteration == 0:
        valid_losses.append(_log_eval(engine, valid_ds, args, device, 0, 0, metrics, "validation"))
    if iteration >= args.train_iters:
        print_rank0(f"the checkpoint is at iteration {iteration}, already --train-iters {args.train_iters}: "
                    "nothing to train (raise --train-iters / TRAIN_ITERS to continue)")
    train_iter = iter(make_loader(train_ds, args, consumed))
    flops = flops_per_iteration(args, num_params)
    last_checkpoint, saved_at = start["path"], iteration
    loss_acc = torch.zeros((), device=device)
    plain_fp32_engine = not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled())
    own_grad_norm = None
    window_start, window_iters, tokens_per_second = time.time(), 0, 0.0

    while iteration < args.train_iters:
        lr = scheduler.step(consumed)
        logging_now = (iteration + 1) % args.log_interval == 0 or iteration + 1 == args.train_iters
        batches = [next(train_iter) for _ in range(args.gradient_accumulation_steps)]
        if optimizer_hooks.curvature_pass_due(optimizer):  # e.g. SophiaG's Hessian refresh
            optimizer_hooks.curvature_pass(engine, optimizer, batches, device, args.seed, iteration)
        for batch in batches:
            loss = lm_loss(engine, batch, device)
            engine.backward(loss)
            if plain_fp32_engine and logging_now and engine.is_gradient_accumulation_boundary():
                # DeepSpeed computes this norm for clipping but keeps it only for ZeRO/bf16/fp16.
                # max_norm=inf: measure only (TP-aware), DeepSpeed does the clipping. An extra
                # pass and all-reduce, so only on iterations that are logged.
                own_grad_norm = float(clip_grad_norm_(engine.module.parameters(), float("inf"), mpu=engine.mpu))
            engine.step()
            loss_acc += loss.detach()
        iteration += 1
        consumed += args.global_batch_size
        window_iters += 1

        if logging_now:
            loss_value = _dp_mean(loss_acc / (args.gradient_accumulation_steps * window_iters))
            accelerator.synchronize()
            elapsed = time.time() - window_start
            ms_per_iter = 1000.0 * elapsed / window_iters
            tokens_per_second = args.global_batch_size * args.seq_length * window_iters / elapsed
            grad_norm = own_grad_norm if plain_fp32_engine else engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            record = dict(
                iteration=iteration,
                consumed_samples=consumed,
                consumed_tokens=consumed * args.seq_length,
                elapsed_time_per_iteration_ms=ms_per_iter,
                learning_rate=lr,
                global_batch_size=args.global_batch_size,
                lm_loss=loss_value,
                grad_norm=grad_norm,
                tokens_per_second=tokens_per_second,
                tflops=flops / (elapsed / window_iters) / args.world_size / 1e12,
            )
            print_rank0(format_log_line(record, args.train_iters))
            metrics.write("train", record)
            train_losses.append(loss_value)
            loss_acc.zero_()
            window_start, window_iters = time.time(), 0
            if not math.isfinite(loss_value):
                print_rank0(f"warning: non-finite loss {loss_value} at iteration {iteration}")

        if args.eval_interval and iteration % args.eval_interval == 0 and iteration < args.train_iters:
            valid_losses.append(_log_eval(engine, valid_ds, args, device, iteration, consumed, metrics, "validation"))
            window_start = time.time()  # evaluation time is not training time

        if args.save_interval and iteration % args.save_interval == 0:
            with optimizer_hooks.evaluation_weights(optimizer, engine):
                last_checkpoint = checkpointing.save_checkpoint(engine, args, iteration, consumed, scheduler)
            saved_at = iteration
            print_rank0(f"saved checkpoint {last_checkpoint}")
            window_start = time.time()
        if args.exit_interval and iteration % args.exit_interval == 0:
            break

    if args.eval_iters and valid_ds is not None:
        valid_losses.append(_log_eval(engine, valid_ds, args, device, iteration, consumed, metrics, "validation"))
    if args.eval_iters and test_ds is not None:
        _log_eval(engine, test_ds, args, device, iteration, consumed, metrics, "test")
    if args.save and saved_at != iteration:
        with optimizer_hooks.evaluation_weights(optimizer, engine):
            last_checkpoint = checkpointing.save_checkpoint(engine, args, iteration, consumed, scheduler)
        print_rank0(f"saved checkpoint {last_checkpoint}")
    metrics.close()
    return TrainResult(iteration, consumed, train_losses, valid_losses, last_checkpoint, tokens_per_second)


def _log_eval(engine, dataset, args, device, iteration, consumed, metrics, split) -> Optional[float]:
    loss = evaluate(engine, dataset, args, device)
    if loss is None:
        return None
    ppl = math.exp(min(loss, 20.0))
    print_rank0(
        f" {split} loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E}"
    )
    metrics.write(split, dict(iteration=iteration, consumed_samples=consumed, lm_loss=loss, ppl=ppl))
    return loss
