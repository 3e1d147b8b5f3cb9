"""Against the tool users would pick instead: Megatron-DeepSpeed (the ALCF fork, the pinned fixture)
on the same model, data, batch and optimizer, three ways in one run:

* ``fork``: the fork alone (``pretrain_gpt_alcf.py``, its own AdamW and cosine schedule);
* ``fork+plugins``: the same command with ``MEGATRON_EXT_PLUGINS=all`` (our AdamW, cosine schedule,
  parametrization and hooks inside the fork);
* ``ours``: megatron_ext's trainer.

    python benchmarks/megatron_deepspeed.py [--iters 40] [--warmup 5] [--rounds 2] [--tiny]

Same llama (RMSNorm, SwiGLU, rotary, GQA, untied embeddings), the fork's Llama-2 tokenizer and a
corpus tokenized by its own preprocessing (tests/megatron_deepspeed/fork_harness.py prepares a
runnable copy of the fixture, its data helpers built), AdamW + cosine, ZeRO 1, fp32, one process.
Data are read in the training process on every side (``--num-workers 0``, our default on CPU; the
fork's default of 2 worker processes would move part of its work out of the process measured).
Each run is a fresh process; the sides alternate ABCCBA for ``--rounds`` rounds and their
iterations after ``--warmup`` are pooled. An iteration's time is taken between the logs of
consecutive iterations (log interval 1), the same way on every side: the fork's ``training_log``
(tests/megatron_deepspeed/record_run.py) and our metrics writer note the wall time and the
process's CPU time as they are called. Prints the median ms/iteration of each side, wall and CPU,
and the two ratios of each: on a shared, loaded machine the wall times swing with the load, the
CPU times much less. Targets: ours at least as fast as the fork (fork / ours >= 1), the plug-ins
at most 1.03x the fork's time.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # the fixture's test harness (runs the fork, prepares its data)

# hidden 256, 4 layers, seq 256, micro batch 4 (= the global batch: one process)
MODEL = ["--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "704", "--num-attention-heads", "4",
         "--num-key-value-heads", "2", "--seq-length", "256", "--max-position-embeddings", "256"]
TINY = []  # the harness's own tiny model (2 layers, hidden 64, seq 64)
SCHEDULE = ["--optimizer", "adamw", "--lr-decay-style", "cosine", "--num-workers", "0"]
SIDES = ("fork", "fork+plugins", "ours")
CLOCKS = {"time": "wall", "cpu": "CPU"}  # record key -> name


def record_ours(out: str, argv) -> int:
    """Our trainer in this process, the time of every train record written (``--side ours``)."""
    from megatron_ext.training import metrics

    write = metrics.MetricsWriter.write
    sink = open(out, "w")

    def timed(self, split, record):
        if split == "train":
            sink.write(json.dumps({"iteration": record["iteration"], "time": time.perf_counter(),
                                   "cpu": time.process_time()}) + "\n")
            sink.flush()
        return write(self, split, record)

    metrics.MetricsWriter.write = timed
    from megatron_ext.train import main

    return main(argv)


def cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def iteration_seconds(records, warmup: int, clock: str):
    """Seconds per iteration (``clock``: "time", wall, or "cpu", the process's CPU time) from
    consecutive logs, after ``warmup`` iterations."""
    times = {r["iteration"]: r[clock] for r in records}
    return [times[i] - times[i - 1] for i in sorted(times) if i - 1 in times and i > warmup]


def run_side(fork, side: str, model, iters: int, work: str, n: int):
    """One run of ``side``: its timestamped log records."""
    from megatron_deepspeed import fork_harness

    flags = SCHEDULE + model
    if side != "ours":
        run = fork.run(flags, plugins="all" if side == "fork+plugins" else None, iters=iters, timeout=3600)
        if side == "fork+plugins" and not (run.report and run.report["optimizer"] and run.report["scheduler"]):
            raise RuntimeError(f"the plug-ins did not run inside the fork: {run.report}")
        return run.records
    out = os.path.join(work, f"ours{n}.jsonl")
    argv = [*fork_harness.OURS_TINY, *flags, "--zero-stage", "1", "--train-iters", str(iters),
            "--data-path", fork.data_prefix, "--tokenizer-model", os.path.join(fork.root, "ALCF", "tokenizer.model"),
            "--data-cache-path", os.path.join(work, "ours-index-cache"), "--eval-iters", "0"]
    proc = subprocess.run([sys.executable, __file__, "--side", "ours", "--record", out, "--", *argv], cwd=work,
                          env=fork.env(), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"our trainer failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in open(out)]


def main():
    bench = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--iters", type=int, default=40)
    bench.add_argument("--warmup", type=int, default=5, help="iterations left out at the start of every run")
    bench.add_argument("--rounds", type=int, default=2, help="ABCCBA rounds (each runs every side twice)")
    bench.add_argument("--tiny", action="store_true", help="the harness's tiny model (checks that it runs)")
    bench.add_argument("--single", action="store_true", help="each side once, no ABCCBA (checks that it runs)")
    bench.add_argument("--work", default=None, help="folder for the fork's copy and the runs (default: a temporary one)")
    bench.add_argument("--out", default=None, help="also write the results as JSON here")
    bench.add_argument("--side", choices=["ours"], help=argparse.SUPPRESS)  # child process
    bench.add_argument("--record", help=argparse.SUPPRESS)
    opts, rest = bench.parse_known_args()
    if opts.side:
        return record_ours(opts.record, rest[1:] if rest[:1] == ["--"] else rest)

    from megatron_deepspeed import fork_harness

    problem = fork_harness.check_packages()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if not os.path.isdir(os.path.join(fork_harness.fixture_dir(), "megatron")):
        print(f"the Megatron-DeepSpeed fixture is not at {fork_harness.fixture_dir()} "
              f"(set {fork_harness.FIXTURE_ENV})", file=sys.stderr)
        return 2
    work = opts.work or tempfile.mkdtemp(prefix="bench-megatron-deepspeed.")
    os.makedirs(work, exist_ok=True)
    print(f"preparing the fork in {work} ...", flush=True)
    fork = fork_harness.prepare(work)
    model = TINY if opts.tiny else MODEL
    pooled = {clock: {side: [] for side in SIDES} for clock in CLOCKS}
    order = list(SIDES) + ([] if opts.single else list(reversed(SIDES)))
    runs = 0
    for _ in range(1 if opts.single else opts.rounds):
        for side in order:
            runs += 1
            records = run_side(fork, side, model, opts.iters, work, runs)
            for clock in CLOCKS:
                pooled[clock][side] += iteration_seconds(records, opts.warmup, clock)
            print(f"  {side:<13} run {runs}: " + ", ".join(
                f"{1000 * statistics.median(iteration_seconds(records, opts.warmup, clock)):8.1f} ms/iteration {name}"
                for clock, name in CLOCKS.items()), flush=True)
    ms = {clock: {side: 1000 * statistics.median(times) for side, times in sides.items()}
          for clock, sides in pooled.items()}
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}"
    print(f"model: {' '.join(model) or 'the harness tiny model'} (micro batch {fork_harness.MICRO}, "
          f"global {fork_harness.GLOBAL}), AdamW + cosine, ZeRO 1, fp32, one process; {machine}")
    result = {"ms_per_iteration": ms, "iterations": {s: len(t) for s, t in pooled["time"].items()},
              "model": model, "machine": machine, "rounds": 1 if opts.single else opts.rounds, "iters": opts.iters,
              "warmup": opts.warmup}
    for side in SIDES:
        print(f"{side:<13}: " + ", ".join(f"{ms[clock][side]:8.1f} ms/iteration {name}" for clock, name in CLOCKS.items())
              + f" ({len(pooled['time'][side])} iterations)")
    for clock, name in CLOCKS.items():
        speedup, plugin_cost = ms[clock]["fork"] / ms[clock]["ours"], ms[clock]["fork+plugins"] / ms[clock]["fork"]
        result[f"ours_speedup_{name}"], result[f"plugin_cost_{name}"] = speedup, plugin_cost
        print(f"{name:<4} ours vs the fork     : {speedup:.3f}x faster (fork ms / ours ms; target >= 1)")
        print(f"{name:<4} plug-ins in the fork : {plugin_cost:.3f}x the fork's time (target <= 1.03)")
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
