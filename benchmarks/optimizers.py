"""Optimizer measurements, each against its baseline in the same run:

1. step time of every registered optimizer relative to AdamW on the same megatron-core model
   (the optimizer's ``step()`` alone, fixed random gradients, median of --step-repeats);
2. training iteration time (forward, backward, step) with Muon relative to AdamW in the real
   trainer, one process and 2 data-parallel processes (Muon splits Newton-Schulz across them),
   ABBA order, a fresh process per run;
3. Muon's Newton-Schulz: batched over same-shaped matrices vs the straightforward per-matrix loop;
   its precision on this machine (a Newton-Schulz-sized product and the Muon step in bf16 vs fp32,
   and what --muon-ns-dtype auto picks) and method (standard vs Gram iteration);
4. convergence on the demo corpus: steps Muon needs to reach AdamW's final validation loss
   (same model, data, LR schedule and LR; Moonlight scaling lets Muon reuse AdamW's LR).

    python benchmarks/optimizers.py [--parts step iteration ns convergence] [--iters 300]

Targets: Muon step <= 1.5x AdamW's on CPU (a training step: part 2); Muon reaches AdamW's final
loss in <= 0.8x the steps. Part 1 shows why the optimizer step alone cannot meet it: Newton-Schulz
costs ~30 h^3 FLOPs per h x h matrix where AdamW costs ~15 h^2, so that ratio grows with the width,
while forward and backward (~6 h^2 per token) shrink it again as tokens per step grow.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "128"]


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_times(repeats):
    from megatron.core import parallel_state as ps

    from megatron_ext.plan import parse_args
    from megatron_ext.models.gpt import build_model
    from megatron_ext.optimizers import OPTIMIZERS
    from megatron_ext.optimizers.common.param_groups import build_param_groups
    from megatron_ext.platform import init_distributed
    from megatron_ext.training.trainer import set_seeds

    init_distributed()
    ps.initialize_model_parallel()
    results = {}
    for name in OPTIMIZERS.names():
        args = parse_args(MODEL + ["--mock-data", "--train-iters", "1", "--optimizer", name, "--zero-stage", "0"],
                          world_size=1)
        set_seeds(1)
        model = build_model(args, 4096)
        groups = build_param_groups(model)
        opt = OPTIMIZERS.get(name).obj(groups, args)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()  # state allocation outside the timing
        results[name] = _median_time(opt.step, repeats)
    return results


def _clean_env():
    # a fresh rendezvous: this process's own (from the step-time part) is still alive
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _iteration_ms(opt, nproc, iters, tmp):
    """Median training iteration time of one fresh run (first logging window dropped: warm-up)."""
    metrics = os.path.join(tmp, f"{opt}-{nproc}-{time.monotonic_ns()}.jsonl")
    launch = ([sys.executable, "-m", "megatron_ext.train"] if nproc == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), "-m", "megatron_ext.train"])
    cmd = launch + [*MODEL, "--mock-data", "--global-batch-size", "16", "--micro-batch-size", str(16 // nproc),
                    "--train-iters", str(iters), "--log-interval", "5", "--eval-iters", "0", "--optimizer", opt,
                    "--zero-stage", "1", "--lr", "1e-3", "--metrics-file", metrics]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, env=_clean_env())
    with open(metrics) as f:
        rows = [json.loads(line) for line in f if '"train"' in line]
    return statistics.median(r["elapsed_time_per_iteration_ms"] for r in rows[1:])


def iteration_times(iters):
    """{nproc: (adamw ms, muon ms)}, each the mean of an A B B A sequence of fresh runs."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, 2):
            runs = {"adamw": [], "muon": []}
            for opt in ("adamw", "muon", "muon", "adamw"):
                runs[opt].append(_iteration_ms(opt, nproc, iters, tmp))
            out[nproc] = (statistics.mean(runs["adamw"]), statistics.mean(runs["muon"]))
    return out


def newton_schulz_times(repeats):
    from megatron_ext.optimizers.muon import newton_schulz

    # the hidden matrices of MODEL: per layer qkv (768x256), proj (256x256), fc1 (1536x256), fc2 (256x768)
    shapes = [(768, 256), (256, 256), (1536, 256), (256, 768)] * 4
    mats = [torch.randn(s) for s in shapes]

    def loop():
        for m in mats:
            newton_schulz(m)

    def batched():
        by_shape = {}
        for m in mats:
            by_shape.setdefault(tuple(m.shape), []).append(m)
        for group in by_shape.values():
            newton_schulz(torch.stack(group))

    loop(), batched()  # warm-up
    return _median_time(loop, repeats), _median_time(batched, repeats)


def muon_variant_step_times(repeats):
    """The Muon step (relative to AdamW's) with each Newton-Schulz precision and method, and a
    Newton-Schulz-sized product X X^T (X 256 x 768, the model's QKV block) in bf16 vs fp32."""
    from megatron.core import parallel_state as ps

    from megatron_ext.models.gpt import build_model
    from megatron_ext.optimizers import OPTIMIZERS
    from megatron_ext.optimizers.common.param_groups import build_param_groups
    from megatron_ext.plan import parse_args
    from megatron_ext.platform import init_distributed
    from megatron_ext.training.trainer import set_seeds

    init_distributed()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    variants = {"adamw": ["--optimizer", "adamw"]}
    for dtype in ("fp32", "bf16"):
        for method in ("standard", "gram"):
            variants[f"muon {dtype} {method}"] = ["--optimizer", "muon", "--muon-ns-dtype", dtype,
                                                  "--muon-ns-method", method]
    variants["muon fp32 per-head gram"] = variants["muon fp32 gram"] + ["--muon-per-head"]
    results = {}
    for name, flags in variants.items():
        args = parse_args(MODEL + ["--mock-data", "--train-iters", "1", "--zero-stage", "0"] + flags, world_size=1)
        set_seeds(1)
        model = build_model(args, 4096)
        opt = OPTIMIZERS.get(args.optimizer).obj(build_param_groups(model), args)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
        results[name] = _median_time(opt.step, repeats)
    x = torch.randn(256, 768)
    products = {}
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        products[str(dtype).replace("torch.", "")] = _median_time(lambda: xd @ xd.mT, 20 * repeats)
    return results, products


def convergence(iters):
    from megatron_ext.launcher.demo import prepare

    demo = prepare(os.path.join(REPO, "data", "demo"))
    finals = {}
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for opt in ("adamw", "muon"):
            metrics = os.path.join(tmp, f"{opt}.jsonl")
            cmd = [sys.executable, "-m", "megatron_ext.train", *MODEL, "--micro-batch-size", "8",
                   "--train-iters", str(iters), "--lr", "3e-3", "--lr-warmup-iters", str(iters // 20),
                   "--lr-decay-style", "cosine", "--min-lr", "3e-4", "--weight-decay", "0.1",
                   "--eval-interval", str(max(1, iters // 20)), "--eval-iters", "8", "--split", "98,2,0",
                   "--data-file-list", demo["data_file_list"], "--tokenizer-type", demo["tokenizer_type"],
                   "--tokenizer-model", demo["tokenizer_model"], "--optimizer", opt, "--zero-stage", "1",
                   "--log-interval", "50", "--metrics-file", metrics]
            subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, env=_clean_env())
            with open(metrics) as f:
                valid = [json.loads(line) for line in f if '"validation"' in line]
            curves[opt] = [(r["iteration"], r["lm_loss"]) for r in valid]
            finals[opt] = valid[-1]["lm_loss"]
    target = finals["adamw"]
    reached = next((it for it, loss in curves["muon"] if loss <= target), None)
    return finals, curves, reached


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-repeats", type=int, default=20)
    p.add_argument("--iters", type=int, default=300, help="training iterations of the convergence runs")
    p.add_argument("--step-iters", type=int, default=30, help="training iterations per timed run (part 2)")
    p.add_argument("--parts", nargs="+", choices=["step", "iteration", "ns", "convergence"],
                   default=["step", "iteration", "ns", "convergence"])
    p.add_argument("--skip-convergence", action="store_true", help="(= --parts step iteration ns)")
    opts = p.parse_args()
    parts = [x for x in opts.parts if not (opts.skip_convergence and x == "convergence")]

    if "step" in parts:
        times = step_times(opts.step_repeats)
        base = times["adamw"]
        print(f"optimizer step time vs adamw ({' '.join(MODEL)}; adamw {1000 * base:.1f} ms):")
        for name, t in sorted(times.items(), key=lambda kv: kv[1]):
            print(f"  {name:<20} {1000 * t:8.1f} ms   x{t / base:5.2f}")
        print(f"  muon / adamw = {times['muon'] / base:.2f}  (the optimizer step alone, one process)")

    if "iteration" in parts:
        print("training iteration time, muon vs adamw (global batch 16 x 128 tokens, ZeRO-1):")
        for nproc, (adamw_ms, muon_ms) in iteration_times(opts.step_iters).items():
            print(f"  {nproc} process(es): adamw {adamw_ms:.1f} ms, muon {muon_ms:.1f} ms, "
                  f"muon / adamw = {muon_ms / adamw_ms:.2f}  (target <= 1.5)")

    if "ns" in parts:
        loop, batched = newton_schulz_times(opts.step_repeats)
        print(f"Newton-Schulz of the 16 hidden matrices: per-matrix loop {1000 * loop:.1f} ms, batched by shape "
              f"{1000 * batched:.1f} ms, speed-up x{loop / batched:.2f}")
        from megatron_ext.optimizers.muon import ns_dtype_for

        variants, products = muon_variant_step_times(opts.step_repeats)
        dtype, why = ns_dtype_for("auto")
        print(f"Newton-Schulz precision here: --muon-ns-dtype auto picks {str(dtype).replace('torch.', '')} ({why})")
        print(f"  X X^T, X 256 x 768: fp32 {1000 * products['float32']:.2f} ms, bf16 {1000 * products['bfloat16']:.2f} ms,"
              f" bf16 / fp32 = {products['bfloat16'] / products['float32']:.2f}")
        base = variants["adamw"]
        for name, t in variants.items():
            print(f"  {name:<26} step {1000 * t:8.1f} ms   x{t / base:6.2f} adamw")

    if "convergence" in parts:
        finals, curves, reached = convergence(opts.iters)
        print(f"convergence on the demo corpus ({opts.iters} iterations each):")
        for opt, curve in curves.items():
            print(f"  {opt:<6} validation loss: " + ", ".join(f"{it}:{loss:.3f}" for it, loss in curve))
        if reached is None:
            print(f"  muon never reached adamw's final loss {finals['adamw']:.4f} (final {finals['muon']:.4f})")
        else:
            print(f"  muon reached adamw's final loss {finals['adamw']:.4f} at iteration {reached}: "
                  f"{reached / opts.iters:.2f}x the steps (target <= 0.8)")


if __name__ == "__main__":
    main()
