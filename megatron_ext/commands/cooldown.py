"""``megatron-ext cooldown CHECKPOINT_DIR --iters R [options] [-- extra training flags]``: print the
exact training command that resumes the checkpoint (at iteration S) and cools the LR down over the
next R iterations, to ``--min-lr``.

The command is the checkpoint's own configuration (its saved ``args``, rebuilt into flags) with
``--load``/``--save``, ``--train-iters S+R`` and ``--lr-cooldown-from-checkpoint R``: iteration S+1
uses the LR the checkpoint's schedule gives there (continuous with the run so far) and iteration
S+R uses ``--min-lr``. Before printing, the command is parsed by the trainer's parser and the
cooldown is applied to the checkpoint's schedule state, so a command that would fail is not printed.
Running the printed command again after an interruption continues the same cooldown.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from typing import Any, Dict, List, Tuple

from megatron_ext.argtypes import one_line_errors, positive_int
from megatron_ext.commands import split_at_double_dash
from megatron_ext.flag_spelling import FlagSpelling, FlagValueError, value_text

# Flags the cooldown command sets itself, or that describe the machine rather than the run.
_SKIP = {
    "load", "save", "train_iters", "train_samples", "train_tokens", "exit_interval", "finetune",
    "override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler", "lr_cooldown_from_checkpoint",
    "gradient_accumulation_steps",  # derived from the global batch and the world size
    "num_workers",  # derived from the machine
    "help",
}


PASS_THROUGH = True  # parsed here: everything after "--" is training flags


def add_parser(sub):
    sub.add_parser("cooldown", help="print the command that cools a checkpoint's run down over R iterations",
                   add_help=False)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-ext cooldown", allow_abbrev=False,
        usage="megatron-ext cooldown CHECKPOINT_DIR --iters R [options] [-- extra training flags]",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    one_line_errors(p)
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                   help="the run's --save directory (its 'latest' checkpoint), or that checkpoint's global_stepN folder")
    p.add_argument("--iters", type=positive_int, required=True, metavar="R",
                   help="cooldown length in iterations (>= 2): iteration S+1 keeps the checkpoint's LR, S+R uses --min-lr")
    p.add_argument("--min-lr", type=float, default=None, help="LR at the end of the cooldown (default: the run's --min-lr)")
    p.add_argument("--lr-wsd-decay-style", "--shape", dest="shape", default=None,
                   help="cooldown shape: 1-sqrt (default), linear or cosine")
    p.add_argument("--save", default=None,
                   help="where the cooldown run saves (default: CHECKPOINT_DIR, so the printed command also "
                        "resumes an interrupted cooldown)")
    p.add_argument("--launcher", default=None,
                   help="command prefix (default: 'python -m megatron_ext.train', or torchrun with the "
                        "checkpoint's world size)")
    return p


def run_argv(argv) -> int:
    argv, extra = split_at_double_dash(argv)
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.iters < 2:
        parser.error(f"--iters {ns.iters}: give at least 2 (iteration S+1 keeps the checkpoint's LR, S+R uses --min-lr)")
    ns.extra = extra
    return run(ns)


class CooldownError(ValueError):
    """One-line error of this command."""


def find_checkpoint(path: str) -> Tuple[str, str]:
    """(load dir, tag) for a save dir or a tag dir; the tag must be the one ``--load`` resumes."""
    from megatron_ext.checkpoint_layout import LATEST, CheckpointFileError, read_latest
    from megatron_ext.checkpoint_layout import find_checkpoint as find

    try:
        load_dir, tag = find(path)
    except CheckpointFileError as e:
        raise CooldownError(str(e)) from None
    latest = read_latest(load_dir)
    if latest != tag:
        raise CooldownError(
            f"{path}: --load {load_dir} resumes from its '{LATEST}' checkpoint ({latest}), not {tag}; to cool down "
            f"{tag}, make a directory holding (a link to) {tag} and a file '{LATEST}' containing '{tag}', "
            "and pass that directory")
    return load_dir, tag


def read_client_state(load_dir: str, tag: str) -> Dict[str, Any]:
    from megatron_ext.checkpoint_layout import CheckpointFileError, client_state

    try:
        state = client_state(os.path.join(load_dir, tag))
    except CheckpointFileError as e:
        raise CooldownError(str(e)) from None
    for key in ("args", "iteration", "consumed_samples", "lr_scheduler"):
        if key not in state:
            raise CooldownError(f"{os.path.join(load_dir, tag)}: no '{key}' in the checkpoint's client state "
                                "(not written by megatron_ext?)")
    return state


def argv_from_args(saved: Dict[str, Any]) -> List[str]:
    """Training flags that reproduce the saved (parsed and finalized) ``args``: every value that
    differs from the parser's default, spelled with the parser's own flags."""
    from megatron_ext.arguments import build_parser

    spelling = FlagSpelling(build_parser())
    out: List[str] = []
    save = saved.get("save")
    for dest, actions in spelling.by_dest.items():
        if dest in _SKIP or dest not in saved:
            continue
        value = saved[dest]
        default = actions[0].default
        if value == default or (isinstance(value, float) and isinstance(default, (int, float))
                                and not isinstance(default, bool) and float(default) == value):
            continue
        if dest == "tensorboard_dir" and save and value == os.path.join(save, "tensorboard"):
            continue  # derived from --save
        try:
            out += spelling.flags(dest, value)
        except FlagValueError as e:
            raise CooldownError(f"cannot express {dest}={value!r} as a flag ({e}); pass it after --") from None
    return out


def build_command(ns) -> Tuple[List[str], List[str], Dict[str, Any]]:
    """(launcher words, training flags, info) for the parsed ``cooldown`` options."""
    load_dir, tag = find_checkpoint(ns.checkpoint)
    client = read_client_state(load_dir, tag)
    saved = client["args"]
    s, r = int(client["iteration"]), ns.iters
    done = (client["lr_scheduler"].get("schedule") or {}).get("cooldown")
    if done:
        raise CooldownError(
            f"{load_dir} ({tag}) was written by a cooldown run (--lr-cooldown-from-checkpoint {done['iterations']}): "
            "to finish an interrupted cooldown, run that command again; to cool down the constant-LR run, "
            "pass a checkpoint from before the cooldown")
    flags = argv_from_args(saved)
    flags += ["--load", load_dir, "--save", os.path.abspath(ns.save) if ns.save else load_dir,
              "--train-iters", str(s + r), "--lr-cooldown-from-checkpoint", str(r)]
    if ns.min_lr is not None:
        flags += ["--min-lr", value_text(ns.min_lr)]
    if ns.shape is not None:
        flags += ["--lr-wsd-decay-style", ns.shape]
    flags += list(ns.extra or [])
    world = int(saved.get("world_size") or 1)
    if ns.launcher:
        launcher = shlex.split(ns.launcher)
    elif world == 1:
        launcher = ["python", "-m", "megatron_ext.train"]
    else:
        launcher = ["torchrun", f"--nproc-per-node={world}", "-m", "megatron_ext.train"]
    return launcher, flags, {"load_dir": load_dir, "tag": tag, "iteration": s, "client": client, "world": world}


def check_command(flags: List[str], info: Dict[str, Any], r: int):
    """Parse with the trainer's parser and apply the cooldown to the checkpoint's schedule state:
    (args, scheduler) of the run the command starts; raises on anything the run would reject."""
    from megatron_ext.plan import parse_args
    from megatron_ext.commands.schedule import _Groups
    from megatron_ext.schedules.common.scheduler import ParamScheduler

    args = parse_args(flags, world_size=info["world"])  # exits with one line on a bad flag
    scheduler = ParamScheduler.from_args(_Groups(), args)
    client = info["client"]
    scheduler.load_state_dict({**client["lr_scheduler"], "position": client["consumed_samples"]})
    return args, scheduler


def run(ns) -> int:
    from megatron_ext.schedules.common.scheduler import ScheduleResumeError

    prog = "megatron-ext cooldown"
    try:
        with contextlib.redirect_stdout(sys.stderr):  # library start-up chatter: stdout is the command
            launcher, flags, info = build_command(ns)
            args, scheduler = check_command(flags, info, ns.iters)
    except (CooldownError, ScheduleResumeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    s, r, gb = info["iteration"], ns.iters, args.global_batch_size
    position = info["client"]["consumed_samples"]
    first = scheduler.schedule.lr(position)
    peak = scheduler.schedule.span.max_lr
    if peak > 0 and first < 0.5 * peak:
        print(f"{prog}: warning: the checkpoint's LR at iteration {s} is already {first:.4g}, {first / peak:.0%} of its "
              f"max {peak:g}: it looks cooled down (a cooldown is meant for a constant-LR / WSD checkpoint)",
              file=sys.stderr)
    last = scheduler.schedule.lr(position + (r - 1) * gb)
    c = scheduler.schedule.cooldown
    print(f"# cool down {info['load_dir']} ({info['tag']}: iteration {s}, {position} samples) over {r} iterations")
    print(f"# iteration {s + 1} uses lr {first:.6g} (the checkpoint's schedule there), iteration {s + r} uses "
          f"lr {last:.6g} (--min-lr), shape {c.shape if c else '?'}")
    if info["world"] > 1 and not ns.launcher:
        print(f"# the checkpoint was written by {info['world']} ranks: launch the command the way that run was "
              "launched (or pass --launcher)")
    print(f"# the curve: megatron-ext schedule {shlex.join(flags)} --steps {max(s - 1, 0)},{s},{s + r - 1}")
    print(shlex.join(launcher + flags))
    return 0
