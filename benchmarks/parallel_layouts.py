"""Tokens/s and peak memory per rank of each parallel layout against data parallelism alone at the
same world size, measured in the same run: TP 2, PP 2 and EP 2 (a 4-expert top-2 MoE, against the
same MoE at EP 1) on 2 ranks; TP 2 x PP 2 and PP 2 x DP 2 on 4 ranks. Prints each layout's ratios
to its baseline.

    python benchmarks/parallel_layouts.py [--layouts tp2 pp2 ...] [--iters 12] [--warmup 3] [--out FILE.json]

Every layout trains the same tiny model on the same global batch (mock data, ZeRO 1, fp32) in a
fresh torchrun of gloo ranks; tokens/s comes from the median iteration time after the warm-up (the
trainer's own ``elapsed_time_per_iteration_ms``), memory from each rank's resident-set high-water
mark minus its resident set when training started (``VmHWM - VmRSS`` of /proc/self/status: the
model, optimizer state, activations and communication buffers the run added; Python and the
libraries are left out). On CPU ranks that share a few cores the numbers show what a layout costs
(its communication and pipeline bubbles), not the speed-up it gives on accelerators.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--mock-data", "--eval-iters", "0",
         "--log-interval", "1", "--lr", "1e-3", "--zero-stage", "1"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2"]
TP, PP, EP = "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--expert-model-parallel-size"

# name -> (world size, flags, the data-parallel layout it is compared with)
LAYOUTS = {
    "dp2": (2, [], None),
    "tp2": (2, [TP, "2"], "dp2"),
    "pp2": (2, [PP, "2"], "dp2"),
    "dp2-moe": (2, MOE, None),
    "ep2-moe": (2, MOE + [EP, "2"], "dp2-moe"),
    "dp4": (4, [], None),
    "tp2xpp2": (4, [TP, "2", PP, "2"], "dp4"),
    "pp2xdp2": (4, [PP, "2"], "dp4"),
}


def _proc_status(key: str) -> int:
    """A /proc/self/status size in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def worker(argv, out: str) -> int:
    """One rank (under torchrun): train ``argv``, write this rank's memory to ``out.rank<r>.json``."""
    from megatron_ext.platform.known_warnings import silence_known_warnings

    silence_known_warnings()
    from megatron_ext.plan import parse_plan
    from megatron_ext.train import close_process_group
    from megatron_ext.training.trainer import pretrain

    import torch

    plan = parse_plan(argv)
    start = _proc_status("VmRSS")
    try:
        pretrain(plan)
        rank = torch.distributed.get_rank()
    finally:
        close_process_group()
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "rss_start": start, "rss_peak": _proc_status("VmHWM")}, f)
    return 0


def run_layout(name, iters, warmup, folder):
    """(tokens/s, [added peak bytes per rank]) of one layout."""
    world, flags, _ = LAYOUTS[name]
    metrics, out = os.path.join(folder, f"{name}.jsonl"), os.path.join(folder, name)
    argv = MODEL + flags + ["--train-iters", str(iters), "--metrics-file", metrics]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                           "--standalone", __file__, "--worker", out, *argv], capture_output=True, text=True,
                          env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with open(metrics) as f:
        train = [json.loads(line) for line in f if '"train"' in line]
    seconds = statistics.median(r["elapsed_time_per_iteration_ms"] for r in train[warmup:]) / 1000
    ranks = [json.load(open(f"{out}.rank{r}.json")) for r in range(world)]
    tokens = int(MODEL[MODEL.index("--global-batch-size") + 1]) * int(MODEL[MODEL.index("--seq-length") + 1])
    return tokens / seconds, [r["rss_peak"] - r["rss_start"] for r in ranks]


def main() -> int:
    bench = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                    allow_abbrev=False)
    bench.add_argument("--layouts", nargs="+", choices=[n for n, (_, _, base) in LAYOUTS.items() if base],
                       default=[n for n, (_, _, base) in LAYOUTS.items() if base])
    bench.add_argument("--iters", type=int, default=12)
    bench.add_argument("--warmup", type=int, default=3, help="iterations left out of the median")
    bench.add_argument("--out", help="also write the results as JSON")
    bench.add_argument("--worker", help=argparse.SUPPRESS)  # a torchrun rank of one layout
    opts, rest = bench.parse_known_args()
    if opts.worker:
        return worker(rest, opts.worker)
    if opts.warmup >= opts.iters:
        bench.error(f"--warmup {opts.warmup} leaves no iteration of --iters {opts.iters} to time")

    names = []
    for name in opts.layouts:  # each baseline runs just before the first layout compared with it
        names += [n for n in (LAYOUTS[name][2], name) if n not in names]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            results[name] = run_layout(name, opts.iters, opts.warmup, folder)
    rows = {}
    for name in names:
        world, _, base = LAYOUTS[name]
        (speed, peaks), (base_speed, base_peaks) = results[name], results[base or name]
        rows[name] = dict(world_size=world, baseline=base, tokens_per_second=speed, peak_bytes_per_rank=peaks,
                          speed_ratio=speed / base_speed, memory_ratio=max(peaks) / max(base_peaks))
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(dict(model=MODEL, iters=opts.iters, warmup=opts.warmup, layouts=rows), f, indent=2)
    mib = 2 ** 20
    print(f"model: {' '.join(MODEL)}; {opts.iters} iterations, median after {opts.warmup}; gloo CPU ranks")
    print(f"{'layout':<9} {'ranks':>5} {'tokens/s':>9} {'x base':>7} {'peak MiB/rank (max)':>20} {'x base':>7}  "
          f"per rank MiB")
    for name, r in rows.items():
        peaks = r["peak_bytes_per_rank"]
        speed_x, memory_x = (f"{r['speed_ratio']:.2f}", f"{r['memory_ratio']:.2f}") if r["baseline"] else ("base",) * 2
        print(f"{name:<9} {r['world_size']:>5} {r['tokens_per_second']:9.0f} {speed_x:>7} {max(peaks) / mib:20.1f} "
              f"{memory_x:>7}  {', '.join(f'{p / mib:.1f}' for p in peaks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
