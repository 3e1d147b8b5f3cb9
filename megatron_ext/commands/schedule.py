"""``megatron-ext schedule [training flags] [--steps 0,100,... | --every N] [--csv F] [--plot F]``:
the LR and weight decay a run with these flags gets, step by step.

It parses the flags with the trainer's own parser (``megatron_ext.plan.parse_args``) and builds
the trainer's own ``ParamScheduler``, so what it shows is what the run gets. ``--mock-data`` is
added when no data flag is given. With ``--load DIR`` it applies the resume rules to the
checkpoint there (``--override-opt-param-scheduler``, ``--use-checkpoint-opt-param-scheduler``,
``--lr-cooldown-from-checkpoint``) and shows the curve of the resumed run.

Step k is the update made after k iterations: it uses the LR at k x global batch samples and is
logged by the trainer as ``iteration=k+1``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
from typing import List, Optional

from megatron_ext.argtypes import positive_int

PASS_THROUGH = True  # everything after the command name is parsed here (own options + training flags)
DATA_FLAGS = ("--mock-data", "--data-path", "--data-file-list")
MAX_PRINTED = 101  # rows printed when neither --steps nor --every is given
PLOT_POINTS = 4001


def add_parser(sub):
    sub.add_parser("schedule", help="print (and write/plot) the LR and weight decay per step for training flags",
                   add_help=False)


def _own_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-ext schedule", allow_abbrev=False, add_help=False,
        description="The LR and weight decay per step for the given training flags (same code as the trainer). "
                    "Every training flag is accepted (see python -m megatron_ext.train --help); these are extra:",
        epilog="Step k is the update after k iterations, logged by the trainer as iteration=k+1.")
    p.add_argument("-h", "--help", action="store_true", help="show this help")
    p.add_argument("--steps", default=None, help="comma-separated steps to show, e.g. 0,100,1000")
    p.add_argument("--every", type=positive_int, default=None, help="show every N-th step (and the last)")
    p.add_argument("--csv", default=None, metavar="FILE", help="write the rows as CSV")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot LR and weight decay (needs matplotlib)")
    p.add_argument("--world-size", type=positive_int, default=1, help="world size the run will have (default 1)")
    return p


def _steps(text: str, parser) -> List[int]:
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            v = int(part)
        except ValueError:
            parser.error(f"argument --steps: invalid step {part!r} (give integers like 0,100,1000)")
        if v < 0:
            parser.error(f"argument --steps: steps are >= 0, got {v}")
        out.append(v)
    if not out:
        parser.error("argument --steps: no steps given")
    return sorted(set(out))


class _Groups:
    """One param group with unit multipliers: the scheduler writes the base LR and weight decay."""

    def __init__(self):
        self.param_groups = [{"lr_mult": 1.0, "wd_mult": 1.0}]


def load_checkpoint_schedule_state(load_dir: str) -> Optional[tuple]:
    """(scheduler state as ``load_checkpoint`` passes it, client state) of the checkpoint ``--load
    load_dir`` resumes from; None if there is none."""
    from megatron_ext.checkpoint_layout import client_state, read_latest

    tag = read_latest(load_dir)
    if tag is None:
        return None
    client = client_state(os.path.join(load_dir, tag))
    if "lr_scheduler" not in client or "consumed_samples" not in client:
        return None  # not written by megatron_ext: the trainer could not resume its schedule either
    return {**client["lr_scheduler"], "position": client["consumed_samples"]}, client


def build_scheduler(argv: List[str], world_size: int = 1):
    """(args, ParamScheduler) for training flags, the checkpoint in --load applied as on resume."""
    from megatron_ext.plan import parse_args
    from megatron_ext.schedules.common.scheduler import ParamScheduler

    argv = list(argv)
    if not any(a.replace("_", "-").split("=")[0] in DATA_FLAGS for a in argv):
        argv.append("--mock-data")
    args = parse_args(argv, world_size=world_size)
    scheduler = ParamScheduler.from_args(_Groups(), args)
    if args.load and not args.finetune:
        loaded = load_checkpoint_schedule_state(args.load)
        if loaded is not None:
            scheduler.load_state_dict(loaded[0])
    return args, scheduler


def rows_for(args, scheduler, steps: List[int]):
    """(step, samples, tokens, lr, wd) per step, computed by the scheduler's own ``step``."""
    gb, seq = args.global_batch_size, args.seq_length
    out = []
    for k in steps:
        lr = scheduler.step(k * gb)
        out.append((k, k * gb, k * gb * seq, lr, scheduler.weight_decay))
    return out


def run_argv(argv) -> int:
    from megatron_ext.checkpoint_layout import CheckpointFileError
    from megatron_ext.commands import parse_own_options
    from megatron_ext.schedules.common.scheduler import ScheduleResumeError

    own = _own_parser()
    opts, rest = parse_own_options(own, argv)
    if opts.steps is not None and opts.every is not None:
        own.error("give --steps or --every, not both")
    steps = _steps(opts.steps, own) if opts.steps is not None else None
    plt = None
    if opts.plot:
        from megatron_ext.plotting import MISSING, pyplot

        plt = pyplot() or own.error(f"--plot {MISSING}")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # library start-up chatter: stdout is the table
            args, scheduler = build_scheduler(rest, opts.world_size)
    except (ScheduleResumeError, CheckpointFileError) as e:  # CheckpointFileError: --load's checkpoint is damaged
        own.error(str(e))
    total = args.train_iters
    if steps is None and opts.every is not None:
        steps = sorted(set(range(0, total, opts.every)) | {total - 1})
    elif steps is None:
        steps = list(range(total))
    all_rows = rows_for(args, scheduler, steps)

    printed = all_rows
    if opts.steps is None and opts.every is None and len(all_rows) > MAX_PRINTED:
        idx = sorted({round(i * (len(all_rows) - 1) / (MAX_PRINTED - 1)) for i in range(MAX_PRINTED)})
        printed = [all_rows[i] for i in idx]
    print(_header(args, scheduler))
    print(f"{'step':>10} {'samples':>14} {'tokens':>16} {'learning_rate':>14} {'weight_decay':>14}")
    for k, samples, tokens, lr, wd in printed:
        print(f"{k:>10d} {samples:>14d} {tokens:>16d} {lr:>14.6E} {wd:>14.6E}")
    if len(printed) < len(all_rows):
        print(f"# {len(printed)} of {len(all_rows)} steps shown; --every 1 shows all, --csv writes all")

    if opts.csv:
        with open(opts.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "samples", "tokens", "learning_rate", "weight_decay"])
            for k, samples, tokens, lr, wd in all_rows:
                w.writerow([k, samples, tokens, repr(lr), repr(wd)])
        print(f"# wrote {opts.csv}")
    if opts.plot:
        # the whole run (at most PLOT_POINTS steps, evenly spaced), whatever rows were chosen
        n = max(total, max(steps) + 1)
        curve = rows_for(args, scheduler, sorted({round(i * (n - 1) / (PLOT_POINTS - 1)) for i in range(PLOT_POINTS)}
                                                 if n > PLOT_POINTS else range(n)))
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ks = [r[0] for r in curve]
        ax.plot(ks, [r[3] for r in curve], label="learning rate", color="tab:blue")
        ax.set_xlabel("step (iterations done)")
        ax.set_ylabel("learning rate")
        ax2 = ax.twinx()
        ax2.plot(ks, [r[4] for r in curve], label="weight decay", color="tab:orange", linestyle="--")
        ax2.set_ylabel("weight decay")
        ax.set_title(f"{scheduler.schedule.style_name}: lr {args.lr:g}, min {args.min_lr:g}, "
                     f"{args.train_iters} iterations")
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [l.get_label() for l in lines], loc="center left")
        fig.tight_layout()
        fig.savefig(opts.plot, dpi=100)
        plt.close(fig)
        print(f"# wrote {opts.plot}")
    return 0


def _header(args, scheduler) -> str:
    s = scheduler.schedule
    gb = args.global_batch_size

    def at(pos):
        it = pos / gb
        return f"{pos:g} samples = {it:g} iteration{'' if it == 1 else 's'}"

    floor = s.cooldown.end_lr if s.cooldown is not None else s.span.min_lr
    lines = [f"# lr schedule: {s.style_name}, lr {s.span.max_lr:g}, min lr {floor:g}; "
             f"global batch {gb}, sequence length {args.seq_length}, {args.train_iters} iterations"]
    for label, pos in s.phases():
        lines.append(f"#   {label}: {at(pos)}")
    wd = scheduler.wd_schedule
    if wd.style == "constant":
        lines.append(f"# weight decay: constant {wd.end:g}")
    else:
        lines.append(f"# weight decay: {wd.style} {wd.start:g} -> {wd.end:g} over {at(wd.length)}")
    lines.append("# step k = the update after k iterations (the trainer logs it as iteration=k+1)")
    return "\n".join(lines)


def main(argv=None) -> int:  # python -m megatron_ext.commands.schedule
    return run_argv(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
