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
from megatron_ext.training.moe_mtp_metrics import AuxiliaryLosses


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
    # loss_mask also masks megatron-core's MTP losses (it defaults to all ones there)
    losses = engine(input_ids=tokens, position_ids=position_ids, attention_mask=None, labels=labels,
                    loss_mask=loss_mask)
    return (losses.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


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
    from megatron_ext import moe_mtp
    from megatron_ext.model import build_model, count_parameters
    from megatron_ext.optimizers import build_optimizer
    from megatron_ext.optimizers import hooks as optimizer_hooks
    from megatron_ext.parametrizations import parametrization_for
    from megatron_ext.platform import accelerator, init_distributed
    from megatron_ext.schedules.scheduler import ParamScheduler
    from megatron_ext.training import checkpointing
    from megatron_ext.training.deepspeed_config import build_deepspeed_config
    from megatron_ext.training.evaluation import MultipleChoiceEval
    from megatron_ext.training.lr_finder import LRFinder
    from megatron_ext.training.mpu import MegatronCoreMPU
    from megatron_ext.training.signals import ExitSignalHandler

    dist = init_distributed(args.distributed_backend)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size)
    device = accelerator.device(dist.local_rank)
    set_seeds(args.seed)

    sources = data_sources(args)
    tokenizer = tokenizer_for(args, sources)
    args.vocab_size_unpadded = tokenizer.vocab_size
    train_ds, valid_ds, test_ds = build_datasets(args, tokenizer, sources)
    mc_eval = MultipleChoiceEval.from_args(args, tokenizer)  # --eval-mc-file (training/evaluation.py)

    parametrization = parametrization_for(args)
    model = build_model(args, tokenizer.vocab_size, parametrization)
    num_params = count_parameters(model)
    optimizer = build_optimizer(model, args, parametrization)
    ds_config = build_deepspeed_config(args)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=MegatronCoreMPU)
    optimizer_hooks.engine_ready(optimizer, engine)  # optimizer hook protocol: megatron_ext/optimizers/hooks.py
    auxiliary = AuxiliaryLosses(model, args)  # MoE aux / MTP losses and expert load (training/moe_mtp_metrics.py)
    # --lr-finder: an LR range test; its sweep replaces the schedule (megatron_ext/training/lr_finder.py)
    finder = LRFinder(args) if args.lr_finder else None
    scheduler = finder.scheduler(optimizer) if finder else ParamScheduler.from_args(optimizer, args)

    start = {"iteration": 0, "consumed_samples": 0, "path": None}
    if args.load:
        start = checkpointing.load_checkpoint(engine, args, scheduler)
    iteration, consumed = start["iteration"], start["consumed_samples"]
    if finder is not None:
        finder.begin(iteration, consumed, engine.skipped_steps)  # sets args.train_iters to the sweep's end
    optimizer_hooks.train_mode(optimizer, engine)  # checkpoints are saved with the evaluation weights

    metrics = MetricsWriter(args)
    train_losses, valid_losses = [], []
    print_rank0(startup_table(args, num_params, start, parametrization.summary()))
    if args.save and torch.distributed.get_rank() == 0:
        os.makedirs(args.save, exist_ok=True)
        with open(os.path.join(args.save, "ds_config.json"), "w") as f:
            json.dump(ds_config, f, indent=2)

    if args.eval_at_start and iteration == 0:
        valid_losses.append(_log_eval(engine, valid_ds, args, device, 0, 0, metrics, "validation"))
        if mc_eval is not None:
            mc_eval.run(engine, device, 0, 0, metrics)
    if iteration >= args.train_iters:
        print_rank0(f"the checkpoint is at iteration {iteration}, already --train-iters {args.train_iters}: "
                    "nothing to train (raise --train-iters / TRAIN_ITERS to continue)")
    train_iter = iter(make_loader(train_ds, args, consumed))
    flops = flops_per_iteration(args, num_params - moe_mtp.idle_expert_parameters(model, args))
    last_checkpoint, saved_at = start["path"], iteration
    loss_acc = torch.zeros((), device=device)
    plain_fp32_engine = not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled())
    own_grad_norm = None
    window_start, window_iters, tokens_per_second = time.time(), 0, 0.0
    exit_signal, stop_signal = ExitSignalHandler.from_args(args, device), 0  # --exit-signal-handler

    while iteration < args.train_iters:
        # --exit-signal-handler (training/signals.py): a SIGTERM/SIGUSR1 that reached any rank stops
        # every rank at this step boundary; the checkpoint is saved below the loop, exit code 0.
        if exit_signal is not None and (stop_signal := exit_signal.stop_requested(iteration)):
            break
        lr = scheduler.step(consumed)
        logging_now = (iteration + 1) % args.log_interval == 0 or iteration + 1 == args.train_iters
        batches = [next(train_iter) for _ in range(args.gradient_accumulation_steps)]
        if optimizer_hooks.curvature_pass_due(optimizer):  # e.g. SophiaG's Hessian refresh
            optimizer_hooks.curvature_pass(engine, optimizer, batches, device, args.seed, iteration)
        iteration_loss = torch.zeros((), device=device)
        for batch in batches:
            loss = lm_loss(engine, batch, device)
            auxiliary.attach(loss)
            engine.backward(loss)
            if plain_fp32_engine and logging_now and engine.is_gradient_accumulation_boundary():
                # DeepSpeed computes this norm for clipping but keeps it only for ZeRO/bf16/fp16.
                # max_norm=inf: measure only (TP-aware), DeepSpeed does the clipping. An extra
                # pass and all-reduce, so only on iterations that are logged.
                own_grad_norm = float(clip_grad_norm_(engine.module.parameters(), float("inf"), mpu=engine.mpu))
            engine.step()
            iteration_loss += loss.detach()
        loss_acc += iteration_loss
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
                **auxiliary.collect(args.gradient_accumulation_steps * window_iters),
            )
            print_rank0(format_log_line(record, args.train_iters))
            metrics.write("train", record)
            train_losses.append(loss_value)
            loss_acc.zero_()
            window_start, window_iters = time.time(), 0
            if not math.isfinite(loss_value):
                print_rank0(f"warning: non-finite loss {loss_value} at iteration {iteration}")

        if finder is not None:  # every iteration's DP-mean loss goes to the range test; no evaluation or saves
            if finder.record(lr, _dp_mean(iteration_loss / args.gradient_accumulation_steps), engine.skipped_steps):
                break
            continue

        if args.eval_interval and iteration % args.eval_interval == 0 and iteration < args.train_iters:
            valid_losses.append(_log_eval(engine, valid_ds, args, device, iteration, consumed, metrics, "validation"))
            window_start = time.time()  # evaluation time is not training time
        if mc_eval is not None and mc_eval.due(iteration, args):
            mc_eval.run(engine, device, iteration, consumed, metrics)
            window_start = time.time()

        if args.save_interval and iteration % args.save_interval == 0:
            with optimizer_hooks.evaluation_weights(optimizer, engine):
                last_checkpoint = checkpointing.save_checkpoint(engine, args, iteration, consumed, scheduler)
            saved_at = iteration
            print_rank0(f"saved checkpoint {last_checkpoint}")
            window_start = time.time()
        if args.exit_interval and iteration % args.exit_interval == 0:
            break

    if finder is not None:  # a range test writes its results and no checkpoint
        finder.finish()
        if exit_signal is not None:
            exit_signal.restore()
        metrics.close()
        return TrainResult(iteration, consumed, train_losses, valid_losses, last_checkpoint, tokens_per_second)
    if args.eval_iters and valid_ds is not None and not stop_signal:  # stopping on a signal: save first, fast
        valid_losses.append(_log_eval(engine, valid_ds, args, device, iteration, consumed, metrics, "validation"))
    if args.eval_iters and test_ds is not None and not stop_signal:
        _log_eval(engine, test_ds, args, device, iteration, consumed, metrics, "test")
    if mc_eval is not None and not stop_signal:
        mc_eval.run(engine, device, iteration, consumed, metrics)
    if args.save and saved_at != iteration:
        with optimizer_hooks.evaluation_weights(optimizer, engine):
            last_checkpoint = checkpointing.save_checkpoint(engine, args, iteration, consumed, scheduler)
        print_rank0(f"saved checkpoint {last_checkpoint}")
    if exit_signal is not None:
        exit_signal.restore()
    metrics.close()
    return TrainResult(iteration, consumed, train_losses, valid_losses, last_checkpoint, tokens_per_second)


def _log_eval(engine, dataset, args, device, iteration, consumed, metrics, split) -> Optional[float]:
    from megatron_ext.training.evaluation import evaluate  # loss + next-token accuracy (training/evaluation.py)

    result = evaluate(engine, dataset, args, device)
    if result is None:
        return None
    loss, accuracy = result["lm_loss"], result["accuracy"]
    ppl = math.exp(min(loss, 20.0))
    print_rank0(
        f" {split} loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E}"
        f" | accuracy: {accuracy:.4f}"
    )
    metrics.write(split, dict(iteration=iteration, consumed_samples=consumed, lm_loss=loss, ppl=ppl, accuracy=accuracy))
    return loss
