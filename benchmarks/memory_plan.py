"""The memory plan against measurement: for every configuration of ``megatron_ext/planning/checks.py``
the estimated peak per device (``megatron-ext plan``) and the peak measured in a real training run
of the same flags on this machine (one rank in this process; several under torchrun, the most
loaded rank), with their ratio. On a CPU the measurement is the CPU allocator's peak recorded by
torch's profiler; on a GPU ``torch.cuda.max_memory_allocated``, and there ``--presets`` adds the
125M/350M/2B presets (bf16, ZeRO 1, the preset's sequence length).

``--megatron-lm`` prints, without running anything, our estimate next to Megatron-LM's
``theoretical_memory_usage`` formula (written here from its description) for an Adam / TP / PP
case; docs/memory_plan.md explains every difference.

    python benchmarks/memory_plan.py [--checks NAME ...] [--repeats N] [--presets] [--megatron-lm]
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRESETS = ("125M", "350M", "2B")


def estimate(argv, world):
    from megatron_ext.plan import parse_plan
    from megatron_ext.planning.report import assess

    return assess(parse_plan(argv, world))


def measure_ranks(argv, ranks, folder, name):
    """Peak bytes of each rank of a real run of ``argv``."""
    if ranks == 1:
        from megatron_ext.planning.measure import measure

        return [measure(argv, world_size=1)["peak_bytes"]], measure.__module__
    from megatron_ext.planning.measure import __name__ as module

    out = os.path.join(folder, name)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for stale in glob.glob(out + ".rank*.json"):
        os.remove(stale)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--standalone",
                    "-m", module, *argv, "--measure-out", out], check=True, capture_output=True, env=env, cwd=REPO)
    return [json.load(open(f))["peak_bytes"] for f in sorted(glob.glob(out + ".rank*.json"))], module


def preset_argv(preset):
    from megatron_ext.launcher.presets import MODEL_PRESETS

    p = MODEL_PRESETS[preset]
    return ["--num-layers", str(p["num_layers"]), "--hidden-size", str(p["hidden_size"]), "--ffn-hidden-size",
            str(p["ffn_hidden_size"]), "--num-attention-heads", str(p["num_attention_heads"]), "--num-key-value-heads",
            str(p["num_key_value_heads"]), "--seq-length", str(p["seq_length"]), "--micro-batch-size", "1",
            "--mock-data", "--vocab-size", "32000", "--train-iters", "3", "--eval-iters", "0", "--bf16",
            "--zero-stage", "1", "--log-interval", "1"]


def row(name, predicted, peaks, how):
    worst = max(peaks)
    spread = f" (ranks {', '.join(f'{p / 2**20:.1f}' for p in peaks)})" if len(peaks) > 1 else ""
    print(f"{name:32s} {predicted / 2**20:10.1f} {worst / 2**20:10.1f} {predicted / worst:7.3f}  {how}{spread}",
          flush=True)


def megatron_lm(args, tp, pp, dp, micro_batches, distributed_optimizer):
    """Megatron-LM's theoretical_memory_usage (weights and optimizer; activations of Table 2 of
    arXiv 2205.05198 with sequence parallelism and selective recomputation), bytes per GPU of its
    first pipeline stage."""
    h, L, V = args.hidden_size, args.num_layers, args.padded_vocab
    kv_ratio = args.num_key_value_heads / args.num_attention_heads
    gated = 1.5 if args.swiglu else 1.0
    layers = 2 * L * h * h * ((1 + kv_ratio) + args.ffn_hidden_size / h * gated + 1 / h) + h
    embedding = h * V
    shard = ((layers - h) / pp + embedding) / tp
    if args.untie_embeddings_and_output_weights and pp == 1:
        shard += embedding / tp + h
    per_param = 6 + 12 / dp if distributed_optimizer else 18
    weights_optimizer = shard * per_param
    s, b = args.seq_length, args.micro_batch_size
    activations = 34 * s * b * h * L
    activations += 8 * s * b * pp + s * b * h * pp  # embedding input and its dropout, pp micro-batches
    if pp > 1:
        activations *= min(1, micro_batches / pp)
    else:
        activations += 4 * s * b * h * (1 + V / h)
    return weights_optimizer, activations / tp


def megatron_lm_comparison():
    import dataclasses

    from megatron_ext.plan import parse_plan
    from megatron_ext.planning.layout import Layout
    from megatron_ext.planning.memory import estimate as plan_estimate
    from megatron_ext.planning.memory import setup_from_plan

    flags = preset_argv("7B") + ["--global-batch-size", "16", "--vocab-size", "32000"]
    tp, pp, dp = 2, 2, 2
    print("Megatron-LM's theoretical_memory_usage and ours, 7B preset (Llama-style, GQA 32/8, SwiGLU 11008), bf16, "
          f"Adam, TP{tp} x PP{pp} x DP{dp}, micro batch 1, 8 micro-batches per step, sequence 4096 (GiB per GPU)")
    print(f"{'':40s} {'weights+opt':>12} {'activations':>12} {'total':>10}")
    for distributed, zero in ((False, 0), (True, 1)):
        plan = parse_plan([f for f in flags] + ["--zero-stage", str(zero)], tp * dp)
        a = plan.args
        a_view = type("A", (), {**{k: getattr(a, k) for k in ("hidden_size", "num_layers", "num_key_value_heads",
                                                                  "num_attention_heads", "swiglu", "ffn_hidden_size",
                                                                  "seq_length", "micro_batch_size",
                                                                  "untie_embeddings_and_output_weights")},
                                "padded_vocab": 32000})
        wo, act = megatron_lm(a_view, tp, pp, dp, 8, distributed)
        name = "distributed optimizer" if distributed else "no distributed optimizer"
        print(f"{'Megatron-LM, ' + name:40s} {wo / 2**30:12.2f} {act / 2**30:12.2f} {(wo + act) / 2**30:10.2f}")
        setup = setup_from_plan(plan, "cuda", here=False, layout=Layout(tp=tp, pp=pp, dp=dp))
        setup = dataclasses.replace(setup, accumulation=8, backend="te")
        m = plan_estimate(setup)
        states = sum(m.term(k) for k in ("weights", "master", "states", "gradients"))
        print(f"{'ours, DeepSpeed ZeRO ' + str(zero) + ' (stage ' + str(m.stage) + ', ' + m.phase + ')':40s} "
              f"{states / 2**30:12.2f} {m.term('activations') / 2**30:12.2f} {m.total / 2**30:10.2f}")
        for t in m.terms:
            print(f"    {t.key:12s} {t.bytes / 2**30:8.2f}  {t.formula}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checks", nargs="*", default=None, help="names from planning/checks.py (default: all)")
    p.add_argument("--repeats", type=int, default=1, help="measure the multi-rank checks this many times")
    p.add_argument("--presets", action="store_true", help="on a GPU: also the 125M/350M/2B presets")
    p.add_argument("--megatron-lm", action="store_true", help="only the comparison with Megatron-LM's formula")
    ns = p.parse_args()
    from megatron_ext.platform.known_warnings import silence_known_warnings

    silence_known_warnings()
    if ns.megatron_lm:
        megatron_lm_comparison()
        return 0
    from megatron_ext.planning.checks import CHECKS, write_ds_config
    from megatron_ext.platform.accelerator import accelerator_name

    print(f"{'configuration':32s} {'est. MiB':>10} {'meas. MiB':>10} {'ratio':>7}  measured with")
    with tempfile.TemporaryDirectory() as folder:
        ds = write_ds_config(folder)
        for check in CHECKS:
            if ns.checks and check.name not in ns.checks:
                continue
            predicted = estimate(check.argv(ds), check.ranks).memory.total
            for _ in range(ns.repeats if check.ranks > 1 else 1):
                peaks, _ = measure_ranks(check.argv(ds), check.ranks, folder, check.name)
                how = "CPU allocator under torch.profiler" if accelerator_name() == "cpu" else "max_memory_allocated"
                row(check.name, predicted, peaks, how)
        if ns.presets:
            if accelerator_name() == "cpu":
                print("--presets: no GPU here (the presets are measured with torch.cuda.max_memory_allocated)")
            else:
                for preset in PRESETS:
                    argv = preset_argv(preset)
                    peaks, _ = measure_ranks(argv, 1, folder, preset)
                    row(f"preset {preset}", estimate(argv, 1).memory.total, peaks, "max_memory_allocated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
