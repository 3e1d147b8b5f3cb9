"""Run one variant of a sweep, and write the job scripts that do the same as batch jobs.

A variant's directory ``DIR/<name>/`` holds ``variant.json`` (its spec: command, environment,
key), ``command.sh`` (the exact command), ``train.log``, ``metrics.jsonl`` and ``result.json``.
``result.json`` is written when the run starts (``status: running``) and when it ends
(``finished``, ``failed`` or ``interrupted``), with ``run_count`` counting the runs of this key.

``python -m megatron_ext.sweeps.runner DIR/<name>`` runs one variant: what a job script runs.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, List, Optional

from megatron_ext.checkpoint_layout import LATEST
from megatron_ext.sweeps.recommend import DEFAULT_SPIKE_THRESHOLD
from megatron_ext.sweeps.results import _write_json, finite, read_records, summarize
from megatron_ext.argtypes import finite_float

SPEC, RESULT, METRICS, LOG, COMMAND, JOB = ("variant.json", "result.json", "metrics.jsonl", "train.log",
                                            "command.sh", "job.sh")
ERROR_LINES = 5
POLL_S = 0.5
TERMINATE_GRACE_S = 20  # a run stopped by the sweep gets this long to exit before SIGKILL
NOISE = ("Warning", "warnings.warn", "[WARNING]", "warn(")


class Interrupted(Exception):
    """The sweep itself was asked to stop (Ctrl-C, SIGTERM)."""


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_spec(vdir: str, spec: dict) -> None:
    os.makedirs(vdir, exist_ok=True)
    _write_json(os.path.join(vdir, SPEC), spec)
    env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in spec["env"].items())
    text = (f"#!/usr/bin/env bash\n# variant {spec['name']} (key {spec['key']}): the exact command the sweep runs\n"
            f"cd {shlex.quote(spec['cwd'])}\n{env}exec {shlex.join(spec['command'])}\n")
    path = os.path.join(vdir, COMMAND)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)


def state(vdir: str, key: str) -> Optional[dict]:
    """The variant's result.json if it belongs to this key."""
    result = read_json(os.path.join(vdir, RESULT))
    return result if result and result.get("key") == key else None


def holder_alive(result: dict) -> bool:
    """Whether a 'running' result is held by a live process on this host (another sweep running it)."""
    if result.get("host") != socket.gethostname() or not result.get("pid"):
        return False
    try:
        os.kill(int(result["pid"]), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def error_lines(log_path: str, n: int = ERROR_LINES) -> List[str]:
    """The last non-warning lines of a log (what a failure says)."""
    try:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()[-400:]
    except OSError:
        return []
    lines = [l.rstrip() for l in lines if l.strip() and not any(s in l for s in NOISE)]
    return lines[-n:]


class _NonFiniteWatch:
    """Reads the records a run appends to its metrics file (from where the file ended at start)
    and reports the first non-finite loss."""

    def __init__(self, path: str):
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.partial = b""

    def check(self) -> Optional[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return None
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("split") in ("train", "validation") and "lm_loss" in r and finite(r["lm_loss"]) is None:
                return f"non-finite {r['split']} loss ({r['lm_loss']}) at iteration {r['iteration']}"
        return None


def _stop(proc: subprocess.Popen, sig: int) -> None:
    """Signal the variant's whole process group (torchrun and its workers), then make sure it ends."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# Set by torchrun (and by our trainer for the process group it starts) for the job a process is in.
JOB_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def variant_environment(environ) -> dict:
    """The environment a variant starts from. A sweep running inside a process group (RANK and
    WORLD_SIZE set: a torchrun worker, a notebook or test process that started one) does not pass
    that group's rank and rendezvous on: each variant is a job of its own, and the group's
    MASTER_PORT is in use (EADDRINUSE). A MASTER_PORT set on its own is the user's and is kept."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return {k: v for k, v in environ.items() if k not in JOB_VARIABLES}
    return dict(environ)


def run_variant(vdir: str, spike_threshold: float = DEFAULT_SPIKE_THRESHOLD,
                say: Callable[[str], None] = print) -> dict:
    """Run the variant in ``vdir`` to its end and return its result (also in ``result.json``).
    A non-finite loss stops it (status failed); Ctrl-C/SIGTERM stop it (status interrupted) and
    raise ``Interrupted``."""
    spec = read_json(os.path.join(vdir, SPEC))
    if spec is None:
        raise FileNotFoundError(f"{vdir}: no {SPEC} (not a sweep variant directory)")
    metrics, log_path = os.path.join(vdir, METRICS), os.path.join(vdir, LOG)
    previous = state(vdir, spec["key"])
    # A rerun continues from the variant's own checkpoint when there is one (its metrics up to
    # there stay; re-logged iterations replace theirs); otherwise it starts over.
    resumes = bool(spec.get("resumes_from")) and os.path.isfile(os.path.join(spec["resumes_from"], LATEST))
    if not resumes and os.path.exists(metrics):
        os.remove(metrics)
    result = {"name": spec["name"], "key": spec["key"], "values": spec["values"], "command": spec["command"],
              "env": spec["env"], "status": "running", "run_count": (previous or {}).get("run_count", 0) + 1,
              "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
              "resumed_from_checkpoint": resumes}
    _write_json(os.path.join(vdir, RESULT), result)

    env = {**variant_environment(os.environ), **spec["env"]}
    if spec["mode"] == "launcher":
        env.pop("DRY_RUN", None)  # the sweep's own --dry-run is how to print without running
        env.setdefault("MEGATRON_EXT_ROOT", spec["cwd"])
    reason, interrupted, proc = None, False, None
    previous_term = signal.getsignal(signal.SIGTERM)
    in_main = _main_thread()  # signal handlers can only be set there
    if in_main:
        signal.signal(signal.SIGTERM, _raise_interrupted)  # a batch job's walltime end: stop cleanly
    try:
        with open(log_path, "a") as log:
            log.write(f"# megatron-ext sweep: run {result['run_count']} of {spec['name']} "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n# {shlex.join(spec['command'])}\n")
            log.flush()
            watch = _NonFiniteWatch(metrics)
            # Its own session: a Ctrl-C in the terminal reaches the sweep only, which stops the
            # whole run (torchrun and its workers) itself.
            proc = subprocess.Popen(spec["command"], cwd=spec["cwd"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            while proc.poll() is None:
                time.sleep(POLL_S)
                reason = watch.check()
                if reason is not None:
                    _stop(proc, signal.SIGKILL)  # nothing left worth saving
                    break
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
        if proc is not None:
            _stop(proc, signal.SIGTERM)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous_term)
    stopped = reason is not None
    if not interrupted and not stopped:
        reason = watch.check()  # written between the last poll and the end of the run
    rc = proc.returncode if proc is not None else None
    result.update(summarize(read_records(metrics), spike_threshold))
    result.update(returncode=rc, ended=time.time(), wall_s=round(time.time() - result["started"], 1))
    result.pop("pid")
    if interrupted:
        result.update(status="interrupted", error=["interrupted by the sweep (Ctrl-C or SIGTERM)"])
    elif reason is not None:
        result.update(status="failed", error=[f"{reason}" + (": stopped by the sweep" if stopped else "")])
    elif rc != 0:
        result.update(status="failed", error=error_lines(log_path) or [f"exit code {rc}"])
    elif not result["curves"]["train_loss"]:
        result.update(status="failed", error=[f"exit code 0 but no train records in {METRICS}"])
    else:
        result["status"] = "finished"
    _write_json(os.path.join(vdir, RESULT), result)
    if interrupted:
        raise Interrupted()
    return result


def _raise_interrupted(signum, frame):
    raise Interrupted()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --- job scripts -----------------------------------------------------------------------------

def job_header(kind: str, name: str, vdir: str, walltime: str, queue: Optional[str], account: Optional[str],
               options: List[str]) -> List[str]:
    """The scheduler lines of one variant's job (PBS, SLURM; none for sh)."""
    out = os.path.join(vdir, "job.out")
    job_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
    if kind == "pbs":
        lines = [f"#PBS -N {job_name}", "#PBS -l select=1", f"#PBS -l walltime={walltime}", "#PBS -j oe",
                 f"#PBS -o {out}"]
        lines += [f"#PBS -q {queue}"] if queue else []
        lines += [f"#PBS -A {account}"] if account else []
        return lines + [f"#PBS {o}" for o in options]
    if kind == "slurm":
        lines = [f"#SBATCH --job-name={job_name}", "#SBATCH --nodes=1", f"#SBATCH --time={walltime}",
                 f"#SBATCH --output={out}"]
        lines += [f"#SBATCH --partition={queue}"] if queue else []
        lines += [f"#SBATCH --account={account}"] if account else []
        return lines + [f"#SBATCH {o}" for o in options]
    return []


def write_job(vdir: str, spec: dict, kind: str, walltime: str, queue: Optional[str] = None,
              account: Optional[str] = None, options: Optional[List[str]] = None,
              setup: Optional[List[str]] = None, spike_threshold: float = DEFAULT_SPIKE_THRESHOLD) -> str:
    """``DIR/<name>/job.sh``: runs the variant through this runner (so ``result.json`` is written).
    Launcher-mode jobs set up Python as ``train_alcf.sh`` does; the others use this interpreter."""
    lines = ["#!/usr/bin/env bash", *job_header(kind, spec["name"], vdir, walltime, queue, account, options or []),
             f"# sweep variant {spec['name']} (key {spec['key']})", "set -eo pipefail",
             f"cd {shlex.quote(spec['cwd'])}"]
    python = shlex.quote(sys.executable)
    helpers = os.path.join(spec["cwd"], "ALCF", "helpers.sh")
    if spec["mode"] == "launcher" and os.path.isfile(helpers):
        lines += [f"export MEGATRON_EXT_ROOT={shlex.quote(spec['cwd'])}", f"source {shlex.quote(helpers)}",
                  "me_setup_python"]
        python = "python"
    lines += list(setup or [])
    lines.append(f"exec {python} -m megatron_ext.sweeps.runner {shlex.quote(vdir)} "
                 f"--spike-threshold {spike_threshold:g}")
    path = os.path.join(vdir, JOB)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o755)
    return path


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m megatron_ext.sweeps.runner",
                                description="Run one variant of a sweep (what the sweep's job scripts run).")
    p.add_argument("variant_dir", help="DIR/<variant> written by megatron-ext sweep --jobs-script")
    p.add_argument("--spike-threshold", type=finite_float, default=DEFAULT_SPIKE_THRESHOLD)
    args = p.parse_args(argv)
    try:
        result = run_variant(args.variant_dir, args.spike_threshold)
    except FileNotFoundError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted:
        return 130
    print(f"{result['name']}: {result['status']}" + (f" ({result['error'][-1]})" if result.get("error") else ""))
    return 0 if result["status"] == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
