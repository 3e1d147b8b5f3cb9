"""``megatron-ext sweep --grid lr=1e-4,3e-4 [--list 'lr=1e-3 seed=2' ...] --steps N --eval-interval K
--out DIR [--config sweep.yaml] [--dry-run] [--jobs-script pbs|slurm|sh [--submit CMD]] [-- training flags]``:
run variants of one training launch and compare them; ``--collect DIR`` gathers the results again.

Every key is a training flag without its dashes (``lr``, ``num_experts``), or with ``--launcher`` a
``train_alcf.sh`` variable (``LR``, ``MODEL_ARCH``). All keys and every variant's whole command are
checked by the trainer's (the launcher's) own parser before the first variant runs. Variants run
one after the other (subprocesses; under torchrun with ``--nproc``) or as batch jobs. A rerun of the
same command skips the finished variants. Outputs in DIR: per variant ``<name>/result.json``,
``results.json``/``results.csv``, plots, ``recommendation.json``. See docs/sweeps.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time

from megatron_ext.argtypes import close_hint, finite_float, positive_int
from megatron_ext.commands import parse_own_options, split_at_double_dash

PASS_THROUGH = True  # everything after the command name is parsed here (own options + training flags)
PROG = "megatron-ext sweep"


def add_parser(sub):
    sub.add_parser("sweep", help="run a grid or list of variants of a training launch; results, plots, "
                                 "recommendation", add_help=False)


def _own_parser() -> argparse.ArgumentParser:
    from megatron_ext.sweeps.recommend import DEFAULT_SPIKE_THRESHOLD, RULES

    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, add_help=False,
        usage=f"{PROG} [--config FILE] [--grid KEY=V1,V2 ...] [--list 'KEY=V ...' ...] [--variants FILE] "
              "--steps N --eval-interval K --out DIR [options] [-- training flags]",
        description="Run variants of one training launch and compare them (docs/sweeps.md). Options not "
                    "listed here, and everything after --, are the base launch's training flags.")
    p.add_argument("-h", "--help", action="store_true", help="show this help")
    g = p.add_argument_group("what to run")
    g.add_argument("--config", metavar="FILE.yaml", help="a sweep described in YAML; options given here win")
    g.add_argument("--grid", action="extend", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="every combination of these values (e.g. --grid lr=1e-4,3e-4 seed=1,2)")
    g.add_argument("--list", action="extend", nargs="+", default=[], metavar="'KEY=V KEY=V'",
                   help="one variant per argument (added to the grid's)")
    g.add_argument("--variants", metavar="FILE", help="one variant per line, like --list")
    g.add_argument("--rule", action="append", default=[], metavar="'KEY=V: KEY=V'",
                   help="variant-level settings: the variants matching the pairs before the colon also get the "
                        "settings after it (e.g. 'moe_router_topk=1: moe_router_pre_softmax=true')")
    g.add_argument("--steps", type=positive_int, metavar="N", help="training iterations of each variant (--train-iters)")
    g.add_argument("--eval-interval", type=positive_int, metavar="K", help="evaluate every K iterations (and at the end)")
    g.add_argument("--out", metavar="DIR", help="the sweep's directory (one subdirectory per variant)")
    g.add_argument("--nproc", type=positive_int, metavar="N", help="processes per variant (torchrun; default 1)")
    g.add_argument("--launcher", action="store_true", default=None,
                   help="run each variant through the train_alcf.sh launcher: UPPER_CASE keys are its "
                        "variables, the environment is its input")
    g.add_argument("--save-checkpoints", action="store_true", default=None,
                   help="each variant saves in DIR/<variant>/checkpoints (a rerun continues from there)")
    g.add_argument("--retry", action="store_true", default=None,
                   help="also rerun variants recorded failed, or submitted/running as a job that may have died")
    g.add_argument("--dry-run", action="store_true", help="print each variant's command and what a run would "
                                                          "skip; run and write nothing")
    g = p.add_argument_group("results")
    g.add_argument("--select", choices=sorted(RULES), help="the recommendation's rule (default val_loss: "
                                                           "lowest final validation loss)")
    g.add_argument("--target-loss", type=finite_float, metavar="L",
                   help="the validation loss the convergence rule counts iterations to (default: the highest final "
                        "validation loss among the finished variants, so every one reaches it)")
    g.add_argument("--spike-threshold", type=finite_float, metavar="X",
                   help=f"flag a logged train loss more than X (fraction) above the lowest before it "
                        f"(default {DEFAULT_SPIKE_THRESHOLD:g})")
    g.add_argument("--collect", metavar="DIR", help="gather DIR's results again (after jobs ran); runs nothing")
    g = p.add_argument_group("batch jobs")
    g.add_argument("--jobs-script", choices=["pbs", "slurm", "sh"],
                   help="write DIR/<variant>/job.sh for each variant instead of running them here")
    g.add_argument("--submit", metavar="CMD", help="submit each job script with CMD (e.g. qsub, sbatch, bash)")
    g.add_argument("--walltime", metavar="HH:MM:SS", help="job walltime (default 01:00:00)")
    g.add_argument("--queue", metavar="Q", help="PBS queue / SLURM partition")
    g.add_argument("--account", metavar="A", help="PBS project (-A) / SLURM account")
    g.add_argument("--job-option", action="append", default=[], metavar="TEXT",
                   help="an extra scheduler line (after #PBS / #SBATCH), e.g. '-l filesystems=home'")
    g.add_argument("--job-setup", action="append", default=[], metavar="LINE",
                   help="a shell line each job runs before the variant (e.g. 'module load conda')")
    return p


def _pick(cli, cfg, key, default=None):
    return cli if cli is not None else cfg.get(key, default)


def _gather(opts, unknown_options, training_flags):
    """(Settings, variants, job settings, select, spike threshold, target loss, retry) from the command line
    over the config file. ``unknown_options`` (before ``--``) are training flags too, unless one
    is a mistyped option of the sweep."""
    from megatron_ext.sweeps import spec as S
    from megatron_ext.sweeps.recommend import DEFAULT_SPIKE_THRESHOLD, RULES

    own_options = [o for o in _own_parser()._option_string_actions if o.startswith("--")]
    unknown = [t.split("=", 1)[0] for t in unknown_options if t.startswith("--")]
    if unknown:
        from megatron_ext.arguments import build_parser, normalise_argv

        trainer_options = build_parser()._option_string_actions
        for name in normalise_argv(unknown):
            hint = close_hint(name, own_options, cutoff=0.75, quote=False)
            if name not in trainer_options and hint:  # a mistyped sweep option, not a training flag
                raise S.SweepError(f"unknown option {name}{hint}")
    cfg = S.load_config(opts.config) if opts.config else {}
    grid = dict(cfg.get("grid", {}))
    grid.update(S.parse_grid(opts.grid))  # a key on the command line replaces the file's values
    listed = [S.parse_variant_text(t, f"--list {t!r}") for t in opts.list]
    if opts.variants:
        listed += S.read_variants_file(opts.variants)
    if not opts.list and not opts.variants:
        listed = cfg.get("variants", [])
    rules = [S.parse_rule(t, f"--rule {t!r}") for t in opts.rule] if opts.rule else cfg.get("rules", [])
    variants = S.expand(grid, listed)
    if variants and rules:
        variants = S.apply_rules(variants, rules)
    if not variants:
        raise S.SweepError("nothing to sweep: give --grid KEY=V1,V2, --list 'KEY=V ...' or --variants FILE "
                           "(or grid:/variants: in --config)")
    out = _pick(opts.out, cfg, "out")
    if not out:
        raise S.SweepError("no output directory: give --out DIR (or out: in --config)")
    launcher = bool(_pick(opts.launcher, cfg, "launcher", False))
    nproc = _pick(opts.nproc, cfg, "nproc")
    if launcher and nproc is not None:
        raise S.SweepError("--nproc: with --launcher the launcher starts the processes (set NGPU_PER_HOST)")
    settings = S.Settings(out=out, base_flags=cfg.get("base_flags", []) + unknown_options + training_flags,
                          base_env=cfg.get("base_env", {}), steps=_pick(opts.steps, cfg, "steps"),
                          eval_interval=_pick(opts.eval_interval, cfg, "eval_interval"), nproc=nproc or 1,
                          launcher=launcher, save_checkpoints=bool(_pick(opts.save_checkpoints, cfg,
                                                                         "save_checkpoints", False)),
                          rule_keys=sorted({k for r in rules for k in r.then}))
    select = _pick(opts.select, cfg, "select", "val_loss")
    if select not in RULES:
        raise S.SweepError(f"select: {select!r} is not one of {', '.join(sorted(RULES))}")
    spike = _pick(opts.spike_threshold, cfg, "spike_threshold", DEFAULT_SPIKE_THRESHOLD)
    if spike <= 0:
        raise S.SweepError(f"--spike-threshold must be > 0, got {spike:g}")
    target = _pick(opts.target_loss, cfg, "target_loss")
    if target is not None and target <= 0:
        raise S.SweepError(f"--target-loss must be > 0, got {target:g}")
    jobs = dict(cfg.get("jobs", {}))
    for key, value in (("script", opts.jobs_script), ("submit", opts.submit), ("walltime", opts.walltime),
                       ("queue", opts.queue), ("account", opts.account)):
        if value is not None:
            jobs[key] = value
    jobs["options"] = list(jobs.get("options", [])) + opts.job_option
    jobs["setup"] = list(jobs.get("setup", [])) + opts.job_setup
    if jobs.get("script") not in (None, "pbs", "slurm", "sh"):
        raise S.SweepError(f"jobs.script: {jobs['script']!r} is not one of pbs, slurm, sh")
    if jobs.get("submit") and not jobs.get("script"):
        raise S.SweepError("--submit needs --jobs-script pbs|slurm|sh")
    return settings, variants, jobs, select, spike, target, bool(_pick(opts.retry, cfg, "retry", False))


def _decide(vdir: str, spec: dict, retry: bool):
    """(run?, why) for one variant, from the result.json already in its directory."""
    import socket

    from megatron_ext.sweeps.runner import RESULT, holder_alive, read_json

    prev = read_json(os.path.join(vdir, RESULT))
    if prev is None:
        return True, None
    if prev.get("key") != spec["key"]:
        return True, f"its definition changed since the result there (key {prev.get('key')} -> {spec['key']})"
    status = prev.get("status")
    if status == "finished":
        return False, "finished"
    if status == "failed":
        return (True, "failed before; --retry") if retry else (False, "failed before (--retry runs it again)")
    if status == "running" and holder_alive(prev):
        return False, f"running in process {prev['pid']}"
    if status in ("submitted", "running") and not (status == "running" and prev.get("host") == socket.gethostname()):
        return (True, f"{status} before; --retry") if retry else (
            False, f"{status} as a job (--collect DIR shows its progress; --retry runs it again)")
    return True, f"{status} before: running it again"


def _move_aside(out_dir: str, vdir: str) -> str:
    """A variant directory from an older definition goes to DIR/.replaced/ (nothing is deleted)."""
    from megatron_ext.sweeps.runner import RESULT, read_json

    old_key = (read_json(os.path.join(vdir, RESULT)) or {}).get("key", "unknown")
    dest = os.path.join(out_dir, ".replaced", f"{os.path.basename(vdir)}-{old_key}-{int(time.time())}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(vdir, dest)
    return dest


def _print_report(out_dir, select, spike, target=None) -> int:
    from megatron_ext.sweeps.report import report
    from megatron_ext.sweeps.results import table

    results, rec, written = report(out_dir, select, spike, target)
    print(table(results, rec))
    print(f"wrote {', '.join(os.path.relpath(p, out_dir) for p in written)} in {out_dir}")
    return 0 if any(r.get("status") == "finished" for r in results) else 1


def run_argv(argv) -> int:
    from megatron_ext.sweeps import runner
    from megatron_ext.sweeps.recommend import DEFAULT_SPIKE_THRESHOLD
    from megatron_ext.sweeps.report import SWEEP
    from megatron_ext.sweeps.results import _write_json
    from megatron_ext.sweeps.spec import SweepError, build_specs, shell_line

    argv, training_flags = split_at_double_dash(argv)
    own = _own_parser()
    opts, rest = parse_own_options(own, argv, normalise=False)

    def fail(message: str) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2

    if opts.collect:
        if opts.grid or opts.list or opts.variants or opts.config or rest or training_flags:
            return fail("--collect DIR reads DIR's results; give it alone (with --select/--spike-threshold/"
                        "--target-loss)")
        if not os.path.isdir(opts.collect):
            return fail(f"--collect {opts.collect}: no such directory")
        spike = opts.spike_threshold if opts.spike_threshold is not None else DEFAULT_SPIKE_THRESHOLD
        if spike <= 0:
            return fail(f"--spike-threshold must be > 0, got {spike:g}")
        if opts.target_loss is not None and opts.target_loss <= 0:
            return fail(f"--target-loss must be > 0, got {opts.target_loss:g}")
        return _print_report(os.path.abspath(opts.collect), opts.select or "val_loss", spike, opts.target_loss)

    try:
        settings, variants, jobs, select, spike, target, retry = _gather(opts, rest, training_flags)
        # library start-up chatter (DeepSpeed, megatron-core) goes to stderr: stdout is the commands
        with contextlib.redirect_stdout(sys.stderr):
            specs = build_specs(settings, variants)
    except SweepError as e:
        return fail(str(e))

    out_dir = os.path.abspath(settings.out)
    plan = []
    for spec in specs:
        vdir = os.path.join(out_dir, spec["name"])
        plan.append((spec, vdir, *_decide(vdir, spec, retry)))
    if opts.dry_run:
        for spec, vdir, run, why in plan:
            print(f"# {spec['name']} (key {spec['key']})" + ("" if run else f": skipped, {why}")
                  + (f": {why}" if run and why else ""))
            print(shell_line(spec))
            if spec.get("resolves_to"):
                print("#   the launcher runs: " + shlex.join(spec["resolves_to"]))
        print(f"# {len(specs)} variants, {sum(1 for p in plan if p[2])} to run; --dry-run: nothing was run or written")
        return 0

    os.makedirs(out_dir, exist_ok=True)
    for spec, vdir, run, why in plan:
        if run and why and why.startswith("its definition changed"):
            print(f"{spec['name']}: {why}; the old directory is now {_move_aside(out_dir, vdir)}")
        runner.write_spec(vdir, spec)
    _write_json(os.path.join(out_dir, SWEEP), {
        "created": time.time(), "argv": sys.argv, "select": select, "spike_threshold": spike, "target_loss": target,
        "settings": {**vars(settings), "out": out_dir}, "variants": [s["name"] for s in specs]})

    if jobs.get("script"):
        return _jobs(plan, jobs, spike, out_dir)

    todo = [p for p in plan if p[2]]
    print(f"sweep: {len(specs)} variants in {out_dir}, {len(todo)} to run"
          + (f", {len(specs) - len(todo)} skipped" if len(todo) < len(specs) else ""))
    for spec, vdir, run, why in plan:
        if not run:
            print(f"  {spec['name']}: skipped ({why})")
    for n, (spec, vdir, run, why) in enumerate(todo, 1):
        print(f"[{n}/{len(todo)}] {spec['name']}: running" + (f" ({why})" if why else "")
              + f"; log {os.path.join(spec['name'], runner.LOG)}", flush=True)
        try:
            result = runner.run_variant(vdir, spike)
        except (runner.Interrupted, KeyboardInterrupt):
            print(f"interrupted during {spec['name']}: the same command resumes the sweep", file=sys.stderr)
            with contextlib.suppress(Exception):
                _print_report(out_dir, select, spike, target)
            return 130
        val = result.get("final_val_loss")
        print(f"[{n}/{len(todo)}] {spec['name']}: {result['status']} in {result['wall_s']:.0f} s"
              + (f", final val loss {val:.4f}" if val is not None else "")
              + (f" ({result['error'][-1]})" if result.get("error") else ""), flush=True)
    return _print_report(out_dir, select, spike, target)


def _jobs(plan, jobs, spike, out_dir) -> int:
    from megatron_ext.sweeps import runner
    from megatron_ext.sweeps.results import _write_json

    submit = shlex.split(jobs["submit"]) if jobs.get("submit") else None
    written, failures = 0, 0
    for spec, vdir, run, why in plan:
        if not run:
            print(f"  {spec['name']}: no job ({why})")
            continue
        path = runner.write_job(vdir, spec, jobs["script"], jobs.get("walltime") or "01:00:00", jobs.get("queue"),
                                jobs.get("account"), jobs.get("options"), jobs.get("setup"), spike)
        written += 1
        if submit is None:
            print(f"  {spec['name']}: {os.path.relpath(path)}")
            continue
        previous = runner.read_json(os.path.join(vdir, runner.RESULT))
        _write_json(os.path.join(vdir, runner.RESULT), {
            "name": spec["name"], "key": spec["key"], "values": spec["values"], "status": "submitted",
            "run_count": (previous or {}).get("run_count", 0) if (previous or {}).get("key") == spec["key"] else 0,
            "submitted": time.time()})
        proc = subprocess.run(submit + [path], capture_output=True, text=True)
        with open(os.path.join(vdir, "submitted.txt"), "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(submit + [path])} -> exit {proc.returncode}: "
                    f"{proc.stdout.strip()} {proc.stderr.strip()}\n")
        if proc.returncode != 0:
            failures += 1
            current = runner.read_json(os.path.join(vdir, runner.RESULT)) or {}
            if current.get("status") == "submitted":  # nothing was queued: forget the submission
                if previous is not None:
                    _write_json(os.path.join(vdir, runner.RESULT), previous)
                else:
                    os.remove(os.path.join(vdir, runner.RESULT))
            err = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [f"exit {proc.returncode}"]
            print(f"  {spec['name']}: submitting failed: {err[0]}", file=sys.stderr)
        else:
            print(f"  {spec['name']}: submitted {proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ''}")
    if submit is None:
        print(f"wrote {written} job scripts; submit them (e.g. for f in {out_dir}/*/{runner.JOB}; "
              f"do qsub \"$f\"; done), then: {PROG} --collect {out_dir}")
    else:
        print(f"submitted {written - failures} of {written} jobs; when they have run: {PROG} --collect {out_dir}")
    return 1 if failures else 0


def main(argv=None) -> int:  # python -m megatron_ext.commands.sweep
    return run_argv(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
