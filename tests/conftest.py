"""Shared helpers: run the real trainer (one process, or several under torchrun on gloo) and read
what it recorded."""
import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny model on synthetic tokens: every test that trains starts from these flags.
TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "64", "--micro-batch-size", "2", "--lr", "1e-3",
    "--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "1",
]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trainer(args, nproc=1, check=True, timeout=300, cwd=None):
    """Run ``python -m megatron_ext.train`` (under torchrun when nproc > 1)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_ext.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "megatron_ext.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_module(module, args, check=False, timeout=120, cwd=None, env=None):
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env={**_env(), **(env or {})}, timeout=timeout, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(path, split="train"):
    """{iteration: record} of one split from a metrics.jsonl file."""
    with open(path) as f:
        records = [json.loads(line) for line in f]
    return {r["iteration"]: r for r in records if r["split"] == split}


def tree_digest(path):
    """{relative path: sha256} of every file under ``path`` (to prove a tool left it untouched)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def error_lines(stderr: str):
    """The non-warning lines a failed command wrote to stderr."""
    noise = ("Warning", "warnings.warn", "[WARNING]", "warn(")
    return [l for l in stderr.strip().splitlines() if l.strip() and not any(n in l for n in noise)]


@pytest.fixture
def repo():
    return REPO
