"""``pretrain(plan)``: the training loop. A DeepSpeed engine (ZeRO 0-3, accumulation, clipping,
precision) around a megatron-core GPTModel; optimizer, LR schedule and parametrization come from
the registries only, every setting from the run plan (``megatron_ext.plan``).

What a run is for is its ``RunMode``: ``Training`` (the schedule from the flags, periodic
evaluation and checkpoints, a final evaluation and save) or the LR finder's range test
(``training/lr_finder.py``: its own LR sweep, a stop rule, no evaluation or checkpoint). The loop
asks the mode for the scheduler, the last iteration, whether to stop after an iteration and
whether to evaluate and save; it never tests which mode it runs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from typing import Any, List, Optional

import numpy as np
import torch

from megatron_ext.models.parallel import splits_model
from megatron_ext.training import pipeline
from megatron_ext.training.curvature_pass import curvature_pass
from megatron_ext.training.expert_bias import ExpertBiasUpdate
from megatron_ext.training.grad_norm import GradNormKeeper, global_grad_norm
from megatron_ext.training.loss import dp_mean, lm_loss
from megatron_ext.training.metrics import MetricsWriter, format_log_line, print_rank0, startup_table
from megatron_ext.training.moe_mtp_metrics import AuxiliaryLosses
from megatron_ext.training.run_mode import RunMode, Training
from megatron_ext.data.gpt_data import build_datasets
from megatron_ext.data.gpt_data import check_batch_tokens, make_loader
from megatron_ext.models.features import moe_mtp
from megatron_ext.models.features.mla import attention_widths
from megatron_ext.models.gpt import build_model
from megatron_ext.models.parallel import parameter_counts
from megatron_ext.optimizers import build_optimizer
from megatron_ext.optimizers.common import hooks as optimizer_hooks
from megatron_ext.platform import accelerator
from megatron_ext.platform import accelerator, init_distributed
from megatron_ext.training import checkpointing
from megatron_ext.training.evaluation import CorpusValidation, MultipleChoiceEval
from megatron_ext.training.evaluation import evaluate # loss + next-token accuracy (training/evaluation.py)
from megatron_ext.training.expert_parallel import wire_expert_parallel
from megatron_ext.training.lr_finder import LRFinder # --lr-finder (training/lr_finder.py)
from megatron_ext.training.signals import ExitSignalHandler, startup_complete


@dataclasses.dataclass
class TrainResult:
    iterations: int
    consumed_samples: int
    train_losses: List[float]  # one per logged iteration
    valid_losses: List[float]  # one per evaluation
    last_checkpoint: Optional[str]
    tokens_per_second: float


def mode_for(plan) -> RunMode:
    if plan.args.lr_finder:

        return LRFinder(plan.args)
    return Training(plan)


def set_seeds(seed: int) -> None:
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def flops_per_iteration(args, num_params: int) -> float:
    """Training FLOPs of one iteration: 6 per (active) parameter per token plus attention scores
    and their weighted sum of values (query-key and value widths: ``mla.attention_widths``)."""

    tokens = args.global_batch_size * args.seq_length
    attention = 6 * args.num_layers * args.seq_length * sum(attention_widths(args))
    return tokens * (6 * num_params + attention)


@dataclasses.dataclass
class Session:
    """Everything built for a run before its first iteration."""

    device: Any
    model: Any
    num_params: int  # the whole model's (every stage, shard and expert)
    expert_params: int  # of them, the routed experts'
    optimizer: Any
    engine: Any
    datasets: tuple  # train, valid, test


def start_session(plan) -> Session:
    """Processes, parallel state, seeds, datasets, model, optimizer and the DeepSpeed engine."""
    import deepspeed
    from megatron.core import parallel_state as ps

    from megatron_ext.training.mpu import MegatronCoreMPU  # megatron-core, as above: only in a run

    args = plan.args
    dist = init_distributed(args.distributed_backend)
    layout = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size)
    if ps.model_parallel_is_initialized() and layout != (ps.get_tensor_model_parallel_world_size(),
                                                         ps.get_pipeline_model_parallel_world_size(),
                                                         ps.get_expert_model_parallel_world_size()):
        ps.destroy_model_parallel()  # an earlier run in this process had another layout
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=layout[0], pipeline_model_parallel_size=layout[1],
                                     expert_model_parallel_size=layout[2])
    device = accelerator.device(dist.local_rank)
    set_seeds(args.seed)
    datasets = build_datasets(args, plan.tokenizer, plan.data_sources)
    model = build_model(args, plan.tokenizer.vocab_size, plan.parametrization)  # this rank's stage and experts
    wire_expert_parallel(model, args)  # --expert-model-parallel-size (training/expert_parallel.py)
    optimizer = build_optimizer(model, args, plan.parametrization)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=plan.ds_config,
                                           mpu=MegatronCoreMPU)
    optimizer_hooks.engine_ready(optimizer, engine)  # optimizer hook protocol: optimizers/common/hooks.py
    total, experts = parameter_counts(model)
    return Session(device, model, total, experts, optimizer, engine, tuple(datasets))


def pretrain(plan, mode: Optional[RunMode] = None) -> TrainResult:
    """Run ``plan`` (``megatron_ext.plan.build_plan``) in ``mode`` (default: what its flags ask)."""

    args = plan.args
    mode = mode or mode_for(plan)
    s = start_session(plan)
    engine, optimizer, device = s.engine, s.optimizer, s.device
    train_ds, valid_ds, test_ds = s.datasets
    mc_eval = MultipleChoiceEval.from_plan(plan)  # --eval-mc-file (training/evaluation.py)
    corpus_eval = CorpusValidation.from_plan(plan)  # --eval-per-corpus (training/evaluation.py)
    auxiliary = AuxiliaryLosses(s.model, args)  # MoE aux / MTP losses and expert load (training/moe_mtp_metrics.py)
    expert_bias = ExpertBiasUpdate(s.model, args)  # --moe-router-enable-expert-bias (training/expert_bias.py)
    active_params = s.num_params - moe_mtp.idle_expert_parameters(s.expert_params, args)
    scheduler = mode.scheduler(optimizer, plan)

    start = {"iteration": 0, "consumed_samples": 0, "path": None}
    if args.load:
        start = checkpointing.load_checkpoint(engine, args, scheduler)
    iteration, consumed = start["iteration"], start["consumed_samples"]
    end = mode.begin(start, engine.skipped_steps)
    optimizer_hooks.train_mode(optimizer, engine)  # checkpoints are saved with the evaluation weights

    metrics = MetricsWriter(args)
    train_losses, valid_losses = [], []
    print_rank0(startup_table(plan, s.num_params, start, scheduler.describe(), active_params))
    for warning in scheduler.resume_warnings(iteration, end):
        print_rank0(warning)
    if args.save and torch.distributed.get_rank() == 0:
        os.makedirs(args.save, exist_ok=True)
        with open(os.path.join(args.save, "ds_config.json"), "w") as f:
            json.dump(plan.ds_config, f, indent=2)

    def evaluate(split, dataset, at):
        loss = _log_eval(engine, dataset, args, device, at, consumed, metrics, split)
        if split == "validation" and corpus_eval is not None:
            corpus_eval.run(engine, args, device, at, consumed, metrics)
        return loss

    if mode.evaluates_and_saves and args.eval_at_start and iteration == 0:
        valid_losses.append(evaluate("validation", valid_ds, 0))
        if mc_eval is not None:
            mc_eval.run(engine, device, 0, 0, metrics)
    if iteration >= end:
        print_rank0(f"the checkpoint is at iteration {iteration}, already --train-iters {end}: "
                    "nothing to train (raise --train-iters / TRAIN_ITERS to continue)")
    train_iter = iter(make_loader(train_ds, args, consumed))
    flops = flops_per_iteration(args, active_params)
    last_checkpoint, saved_at = start["path"], iteration
    loss_acc = torch.zeros((), device=device)
    # DeepSpeed computes the gradient norm for clipping but keeps it only for ZeRO/bf16/fp16; where
    # the model is split over ranks its own fp32 clipping norm is wrong (training/grad_norm.py).
    plain_fp32_engine = not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled())
    norm_keeper = GradNormKeeper(engine) if plain_fp32_engine and splits_model() else None
    own_grad_norm = None
    pipelined = pipeline.is_pipelined()
    window_start, window_iters, tokens_per_second = time.time(), 0, 0.0
    startup_complete()  # a SIGTERM from here on is the loop's (train.py: before, it ends the start-up)
    exit_signal, stop_signal = ExitSignalHandler.from_args(args, device), 0  # --exit-signal-handler

    while iteration < end:
        # --exit-signal-handler (training/signals.py): a SIGTERM/SIGUSR1 that reached any rank stops
        # every rank at this step boundary; the checkpoint is saved below the loop, exit code 0.
        if exit_signal is not None and (stop_signal := exit_signal.stop_requested(iteration)):
            break
        lr = scheduler.step(consumed)
        logging_now = (iteration + 1) % args.log_interval == 0 or iteration + 1 == end
        batches = [next(train_iter) for _ in range(args.gradient_accumulation_steps)]
        for batch in batches:
            check_batch_tokens(batch, plan.tokenizer.vocab_size)
        if optimizer_hooks.curvature_pass_due(optimizer):  # e.g. SophiaG's Hessian refresh
            curvature_pass(engine, optimizer, batches, device, args.seed, iteration)
            expert_bias.discard_counts()  # the only counted forward besides training's (evaluation: no grad)
        if pipelined:  # megatron-core's schedule through the stages, then the engine's step
            iteration_loss = pipeline.train_step(engine, batches, device)
        else:
            iteration_loss = torch.zeros((), device=device)
            for batch in batches:
                loss = lm_loss(engine, batch, device)
                auxiliary.attach(loss)
                engine.backward(loss)
                if (plain_fp32_engine and norm_keeper is None and logging_now
                        and engine.is_gradient_accumulation_boundary()):
                    own_grad_norm = global_grad_norm(engine.module)
                engine.step()
                iteration_loss += loss.detach()
        if norm_keeper is not None:
            own_grad_norm = norm_keeper.last
        expert_bias.after_optimizer_step()  # once per optimizer step, after its last micro-batch
        loss_acc += iteration_loss
        iteration += 1
        consumed += args.global_batch_size
        window_iters += 1

        if logging_now:
            loss_value = dp_mean(loss_acc / (args.gradient_accumulation_steps * window_iters))
            accelerator.synchronize()
            elapsed = time.time() - window_start
            tokens_per_second = args.global_batch_size * args.seq_length * window_iters / elapsed
            grad_norm = own_grad_norm if plain_fp32_engine else engine.get_global_grad_norm()
            record = dict(
                iteration=iteration,
                consumed_samples=consumed,
                consumed_tokens=consumed * args.seq_length,
                elapsed_time_per_iteration_ms=1000.0 * elapsed / window_iters,
                learning_rate=lr,
                global_batch_size=args.global_batch_size,
                lm_loss=loss_value,
                grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                tokens_per_second=tokens_per_second,
                tflops=flops / (elapsed / window_iters) / args.world_size / 1e12,
                **auxiliary.collect(args.gradient_accumulation_steps * window_iters),
            )
            print_rank0(format_log_line(record, end))
            metrics.write("train", record)
            train_losses.append(loss_value)
            loss_acc.zero_()
            window_start, window_iters = time.time(), 0
            if not math.isfinite(loss_value):
                print_rank0(f"warning: non-finite loss {loss_value} at iteration {iteration}")

        if mode.after_iteration(lr, iteration_loss / args.gradient_accumulation_steps, engine):
            break
        if not mode.evaluates_and_saves:
            continue
        if args.eval_interval and iteration % args.eval_interval == 0 and iteration < end:
            valid_losses.append(evaluate("validation", valid_ds, iteration))
            window_start = time.time()  # evaluation time is not training time
        if mc_eval is not None and mc_eval.due(iteration, args):
            mc_eval.run(engine, device, iteration, consumed, metrics)
            window_start = time.time()
        if args.save_interval and iteration % args.save_interval == 0:
            last_checkpoint = _save(engine, optimizer, args, iteration, consumed, scheduler)
            saved_at = iteration
            window_start = time.time()
        if args.exit_interval and iteration % args.exit_interval == 0:
            break

    mode.finish()
    if mode.evaluates_and_saves:
        if not stop_signal:  # stopping on a signal: save first, fast
            if args.eval_iters and valid_ds is not None:
                valid_losses.append(evaluate("validation", valid_ds, iteration))
            if args.eval_iters and test_ds is not None:
                evaluate("test", test_ds, iteration)
            if mc_eval is not None:
                mc_eval.run(engine, device, iteration, consumed, metrics)
        if args.save and saved_at != iteration:
            last_checkpoint = _save(engine, optimizer, args, iteration, consumed, scheduler)
    if exit_signal is not None:
        exit_signal.restore()
    metrics.close()
    return TrainResult(iteration, consumed, train_losses, valid_losses, last_checkpoint, tokens_per_second)


def _save(engine, optimizer, args, iteration, consumed, scheduler) -> str:

    with optimizer_hooks.evaluation_weights(optimizer, engine):
        path = checkpointing.save_checkpoint(engine, args, iteration, consumed, scheduler)
    print_rank0(f"saved checkpoint {path}")
    return path


def _log_eval(engine, dataset, args, device, iteration, consumed, metrics, split) -> Optional[float]:

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
