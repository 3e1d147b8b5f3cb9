"""What making checkpoints durable costs: the save of the demo-sized model (the ``tiny`` preset,
1.8M parameters, AdamW state) with the fsync of every file and folder before the checkpoint is
published, against the same save with fsync switched off, in the same process, ABBA order.

    python benchmarks/checkpoint_save.py [--repeats 4]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=4)
    ns = p.parse_args()
    from megatron_ext import fileio
    from megatron_ext.plan import parse_plan
    from megatron_ext.schedules.common.scheduler import ParamScheduler
    from megatron_ext.training import checkpointing
    from megatron_ext.training.trainer import start_session

    with tempfile.TemporaryDirectory() as tmp:
        plan = parse_plan(["--num-layers", "4", "--hidden-size", "128", "--ffn-hidden-size", "384",
                           "--num-attention-heads", "4", "--num-key-value-heads", "2", "--seq-length", "128",
                           "--mock-data", "--vocab-size", "4096", "--train-iters", "1", "--save", tmp], world_size=1)
        s = start_session(plan)
        scheduler = ParamScheduler.from_args(s.optimizer, plan.args)
        real = fileio.fsync_tree
        times = {"fsync": [], "no fsync": []}
        order = ["fsync", "no fsync", "no fsync", "fsync"] * ns.repeats
        for i, mode in enumerate(order):
            fileio.fsync_tree = real if mode == "fsync" else (lambda path: None)
            t0 = time.perf_counter()
            checkpointing.save_checkpoint(s.engine, plan.args, i + 1, 8 * (i + 1), scheduler)
            times[mode].append(time.perf_counter() - t0)
        fileio.fsync_tree = real
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(tmp, "global_step1"))
                   for f in fs)
    a, b = statistics.median(times["fsync"]), statistics.median(times["no fsync"])
    print(f"checkpoint of {size / 1e6:.1f} MB: save {1000 * a:.1f} ms with fsync, {1000 * b:.1f} ms without "
          f"(median of {len(times['fsync'])} each): ratio {a / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
