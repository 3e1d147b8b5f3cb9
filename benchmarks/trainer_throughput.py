"""Tokens/s of megatron_ext's trainer vs a minimal hand-written loop over the same megatron-core
model, DeepSpeed engine and data, in one process and one run. Prints the ratio (target >= 0.95).

    python benchmarks/trainer_throughput.py [--iters 40] [trainer flags...]

Each side's speed is the median iteration time after a warm-up, so start-up and evaluation are
not counted. Every measurement runs in a fresh process (a second engine in the same process runs
measurably slower than the first), and the sides alternate ABBA for --rounds rounds with all their
iterations pooled, to even out drift on a shared machine.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

DEFAULT_MODEL = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
                 "--micro-batch-size", "4", "--mock-data", "--eval-iters", "0", "--log-interval", "1",
                 "--lr", "1e-3", "--zero-stage", "1"]


def hand_loop(args, iters, warmup):
    """The least a user would write: model, AdamW, DeepSpeed engine, loader, forward/backward/step."""
    import deepspeed

    from megatron_ext.data.gpt_data import build_datasets, make_loader, tokenizer_for
    from megatron_ext.models.gpt import build_model
    from megatron_ext.training.deepspeed_config import build_deepspeed_config
    from megatron_ext.training.mpu import MegatronCoreMPU
    from megatron_ext.training.trainer import set_seeds

    set_seeds(args.seed)
    tokenizer = tokenizer_for(args, None)
    train, _, _ = build_datasets(args, tokenizer, None)
    model = build_model(args, tokenizer.vocab_size)
    from megatron_ext.optimizers.common.param_groups import build_param_groups
    opt = torch.optim.AdamW(build_param_groups(model), lr=args.lr, weight_decay=args.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=build_deepspeed_config(args),
                                           mpu=MegatronCoreMPU)
    it = iter(make_loader(train, args, 0))
    times = []
    for step in range(iters):
        t0 = time.perf_counter()
        for _ in range(args.gradient_accumulation_steps):
            b = next(it)
            losses = engine(input_ids=b["tokens"], position_ids=b["position_ids"], attention_mask=None,
                            labels=b["labels"])
            loss = (losses * b["loss_mask"]).sum() / b["loss_mask"].sum()
            engine.backward(loss)
            engine.step()
        loss.item()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def measure(side, argv, iters, warmup):
    """Run one side in this process; returns its per-iteration seconds after warm-up."""
    from megatron.core import parallel_state as ps

    from megatron_ext.plan import parse_args, parse_plan
    from megatron_ext.platform import init_distributed
    from megatron_ext.training.trainer import pretrain

    args = parse_args(argv)
    init_distributed(args.distributed_backend)
    ps.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size)
    if side == "hand":
        return hand_loop(args, iters, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        pretrain(parse_plan(argv + ["--metrics-file", metrics]))
        with open(metrics) as f:
            records = [json.loads(line) for line in f if '"train"' in line]
    return [r["elapsed_time_per_iteration_ms"] / 1000 for r in records[warmup:]]


def main():
    bench = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--iters", type=int, default=40)
    bench.add_argument("--warmup", type=int, default=5)
    bench.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each runs both sides twice)")
    bench.add_argument("--side", choices=["hand", "trainer"], help=argparse.SUPPRESS)  # child process
    opts, rest = bench.parse_known_args()
    argv = DEFAULT_MODEL + ["--train-iters", str(opts.iters)] + rest

    if opts.side:
        times = measure(opts.side, argv, opts.iters, opts.warmup)
        print("TIMES " + json.dumps(times), flush=True)
        return 0

    pooled = {"hand": [], "trainer": []}
    for _ in range(opts.rounds):
        for side in ("hand", "trainer", "trainer", "hand"):
            proc = subprocess.run([sys.executable, __file__, "--side", side, "--iters", str(opts.iters),
                                   "--warmup", str(opts.warmup), *rest], capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("TIMES ")]
            if proc.returncode != 0 or not line:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            pooled[side] += json.loads(line[-1][6:])
    hand, trainer = statistics.median(pooled["hand"]), statistics.median(pooled["trainer"])
    from megatron_ext.plan import parse_args

    parsed = parse_args(argv, world_size=1)
    tokens = parsed.global_batch_size * parsed.seq_length
    print(f"model: {' '.join(argv)}")
    print(f"hand-written loop : {tokens / hand:10.1f} tokens/s  ({1000 * hand:.1f} ms/iter, {len(pooled['hand'])} iterations)")
    print(f"megatron_ext      : {tokens / trainer:10.1f} tokens/s  ({1000 * trainer:.1f} ms/iter, {len(pooled['trainer'])} iterations)")
    print(f"ratio trainer/hand: {hand / trainer:.3f}  (target >= 0.95)")
    return 0

if __name__ == "__main__":
    sys.exit(main())
