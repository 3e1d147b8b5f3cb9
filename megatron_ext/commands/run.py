"""``megatron-ext run CONFIG.yaml [--dry-run] [-- training flags]``: run an OpenSeek-style experiment
(an experiment file naming a job file, docs/experiment_configs.md) with everything under the
folder ``experiment.exp_dir`` (default ``experiment.exp_name``):

    command.sh          the exact command (environment, before_start, torchrun ...), runnable
    config.yaml         the experiment and job config merged, interpolations resolved
    train_args.txt      the trainer flags the keys became (training flags after -- last: they win)
    resolved_args.json  every flag of the run as the trainer resolved it
    logs/<time>/attempt_0/<rank>/stdout.log, stderr.log   every rank's output (torchrun --log-dir)
    metrics.jsonl, tensorboard/, checkpoints/

The same command resumes the experiment from its checkpoints. Any unknown key or bad value is one
line naming the key (exit code 2) before anything is written.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time

from megatron_ext.argtypes import one_line_errors
from megatron_ext.commands import split_at_double_dash

PASS_THROUGH = True  # its own options, then training flags after --
PROG = "megatron-ext run"


def add_parser(sub):
    sub.add_parser("run", help="run an OpenSeek-style experiment config (experiment + job YAML) into a folder "
                               "named after experiment.exp_name", add_help=False)


def _own_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                usage=f"{PROG} CONFIG.yaml [--dry-run] [-- training flags]",
                                description="Run an OpenSeek-style experiment config (docs/experiment_configs.md).")
    p.add_argument("config", metavar="CONFIG.yaml", help="the experiment file (its defaults: name the job file)")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the command; write nothing")
    return one_line_errors(p)


def plan_experiment(config: str, extra_flags=()):
    """(Experiment, trainer argv, RunPlan): the config read and the whole command planned by the
    trainer; ConfigError with one line per problem (trainer messages said in the config's keys)."""
    from megatron_ext.arguments import build_parser
    from megatron_ext.experiment_config import ConfigError, read, say_in_keys
    from megatron_ext.plan import plan_or_problem

    parser = build_parser(prog=PROG)
    exp = read(config, parser)
    argv = exp.argv + list(extra_flags)
    plan, problem = plan_or_problem(parser, argv, exp.nproc)
    if problem is not None:
        raise ConfigError(f"{config}: {say_in_keys(problem, exp.sources)}")
    return exp, argv, plan


def command_for(exp, argv, stamp: str):
    """torchrun over the trainer, each rank's stdout/stderr kept in ``logs/`` (also shown here)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(exp.nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", stamp,
            "--log-dir", os.path.join(exp.folder, "logs"), "--redirects", "3", "--tee", "3",
            "-m", "megatron_ext.train", *argv]


def shell_script(exp, command) -> str:
    lines = ["#!/usr/bin/env bash", f"# {PROG}: experiment {exp.name}", "set -euo pipefail",
             f"cd {shlex.quote(os.getcwd())}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in exp.env.items()]
    if exp.before_start:
        lines.append(exp.before_start)
    lines.append(shlex.join(command))
    return "\n".join(lines) + "\n"


def run_argv(argv) -> int:
    from megatron_ext.experiment_config import ConfigError

    own_argv, training_flags = split_at_double_dash(argv)
    opts = _own_parser().parse_args(own_argv)
    if not os.path.isfile(opts.config):
        print(f"{PROG}: error: {opts.config}: no such file", file=sys.stderr)
        return 2
    try:
        with contextlib.redirect_stdout(sys.stderr):  # library start-up chatter is not the command's output
            exp, argv, plan = plan_experiment(opts.config, training_flags)
    except ConfigError as e:  # every problem of the config, one line each
        for line in str(e).splitlines():
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d_%H%M%S")
    command = command_for(exp, argv, stamp)
    print(f"experiment {exp.name}: {exp.folder} ({exp.nproc} process{'es' if exp.nproc > 1 else ''})")
    for note in exp.notes:
        print(f"  note: {note}")
    print("command:\n  " + shlex.join(command))
    if opts.dry_run:
        print("--dry-run: nothing was run or written")
        return 0
    os.makedirs(os.path.join(exp.folder, "logs"), exist_ok=True)
    _write(exp.folder, "command.sh", shell_script(exp, command))
    _write(exp.folder, "train_args.txt", "".join(f"{t}\n" if t.startswith("--") else f"  {t}\n" for t in argv))
    _write(exp.folder, "resolved_args.json", json.dumps(
        {k: v for k, v in vars(plan.args).items() if not k.startswith("_")}, indent=2, default=str) + "\n")
    import yaml

    _write(exp.folder, "config.yaml", yaml.safe_dump(exp.resolved, sort_keys=False))
    env = {**os.environ, **exp.env}
    if exp.before_start:
        proc = subprocess.run(["bash", "-c", f"{exp.before_start}\nexec {shlex.join(command)}"], env=env)
    else:
        proc = subprocess.run(command, env=env)
    print(f"experiment {exp.name}: exit {proc.returncode}; logs in {os.path.join(exp.folder, 'logs', stamp)}")
    return proc.returncode


def _write(folder: str, name: str, text: str) -> None:
    from megatron_ext.fileio import write_text_atomically

    path = os.path.join(folder, name)
    write_text_atomically(path, text)
    if name.endswith(".sh"):
        os.chmod(path, 0o755)


def main(argv=None) -> int:  # python -m megatron_ext.commands.run
    return run_argv(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
