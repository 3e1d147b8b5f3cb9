"""Shared helpers: run the real trainer (one process, or several under torchrun on gloo) and read
what it recorded."""
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading

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


class InProcessRun:
    """What ``subprocess.run`` returns, for a trainer run inside the test process."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_in_process(entry, args, cwd=None) -> InProcessRun:
    """``entry(args)`` (a command's main function) in this process, its output captured: the same
    code path as the command, without ~6 s of imports per run. For training, one process group of
    size 1 (and tensor-parallel size 1) serves every such run; other layouts use torchrun."""
    import contextlib
    import io
    import traceback
    import warnings

    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    # the trainer writes RANK/WORLD_SIZE/MASTER_PORT... into the environment: a process a later test
    # starts must not inherit them (it would try to listen on this process group's port)
    environ = dict(os.environ)
    os.chdir(cwd or REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            try:
                code = entry(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except Exception:  # noqa: BLE001 - reported like a crashed process would be
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(before)
        os.environ.clear()
        os.environ.update(environ)
    return InProcessRun(code, out.getvalue(), err.getvalue())


def run_trainer(args, nproc=1, check=True, timeout=300, cwd=None, isolated=False):
    """Run ``megatron_ext.train``: in this process for one rank (``isolated=True``: a fresh
    ``python -m megatron_ext.train``), under torchrun when nproc > 1."""
    if nproc == 1 and not isolated and threading.current_thread() is threading.main_thread():
        from megatron_ext.train import run

        proc = run_in_process(run, args, cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_ext.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "megatron_ext.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# Modules whose command runs in this process when a test needs no other environment.
IN_PROCESS = {"megatron_ext.train": ("megatron_ext.train", "run"), "megatron_ext.cli": ("megatron_ext.cli", "main")}


def run_module(module, args, check=False, timeout=120, cwd=None, env=None):
    if module in IN_PROCESS and env is None:
        import importlib

        name, function = IN_PROCESS[module]
        proc = run_in_process(getattr(importlib.import_module(name), function), args, cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc
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


@pytest.fixture(scope="module")
def mcore():
    """A one-process group and megatron-core's parallel state in this process (the same the in-process
    trainer uses), seeded: for tests that build megatron-core modules directly."""
    from megatron.core import parallel_state as ps

    from megatron_ext.platform import init_distributed
    from megatron_ext.training.trainer import set_seeds

    init_distributed()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    set_seeds(1)  # megatron-core's local attention forks the model-parallel RNG even without dropout
    return ps


def make_hf_corpus(folder, documents=600, tokenizer=None):
    """A real (tiny) data set with a Hugging Face tokenizer: ``folder/tokenizer.json`` (byte-level BPE
    with ``</s>``, or ``tokenizer`` when given), ``folder/corpus_text_document.{bin,idx}``
    (``documents`` short documents) and a data file list ``folder/list.txt``. Built in-process in
    about a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_ext.data.preprocess import main as preprocess

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    words = "the a model trains on data and learns to predict the next token of its text".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12 + i % 9)) for i in range(documents)]
    with open(os.path.join(folder, "corpus.jsonl"), "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    if tokenizer is None:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                          show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer = os.path.join(folder, "tokenizer.json")
        tok.save(tokenizer)
    prefix = os.path.join(folder, "corpus")
    preprocess(["--input", os.path.join(folder, "corpus.jsonl"), "--output-prefix", prefix,
                "--tokenizer-type", "HFTokenizer", "--tokenizer-model", tokenizer])
    data_list = os.path.join(folder, "list.txt")
    with open(data_list, "w") as f:
        f.write(f"1.0 {prefix}_text_document corpus\n")
    return {"tokenizer": tokenizer, "prefix": f"{prefix}_text_document", "data_list": data_list}


@pytest.fixture(scope="session")
def hf_corpus(tmp_path_factory):
    return make_hf_corpus(tmp_path_factory.mktemp("hf_corpus"))


# -- the layout-equivalence check -----------------------------------------------------------------
# Engine layouts of one global batch of 4 samples: each must reproduce the single-process ZeRO run
# (the same losses to float rounding). Multi-process layouts run under torchrun: slow tier.
LAYOUTS = {
    "zero1": (["--zero-stage", "1", "--micro-batch-size", "4"], 1),
    "dp2-zero0": (["--zero-stage", "0", "--micro-batch-size", "2"], 2),
    "dp2-zero1": (["--zero-stage", "1", "--micro-batch-size", "2"], 2),
    "dp2-zero2": (["--zero-stage", "2", "--micro-batch-size", "1"], 2),  # with accumulation 2
    "tp2": (["--tensor-model-parallel-size", "2", "--micro-batch-size", "4"], 2),
    "tp2-zero1": (["--zero-stage", "1", "--tensor-model-parallel-size", "2", "--micro-batch-size", "4"], 2),
}


def layouts(*names):
    """``pytest.param(name, flags, nproc)`` for these layouts (use as parametrize values)."""
    return [pytest.param(name, *LAYOUTS[name], id=name, marks=[pytest.mark.slow] if LAYOUTS[name][1] > 1 else [])
            for name in names]


def run_layouts(runs, nproc, folder, timeout=900):
    """Several trainer runs (lists of flags) in one torchrun of ``nproc`` ranks
    (``tests/layout_runs.py``): the ranks start once for all of them."""
    path = os.path.join(str(folder), "runs.json")
    with open(path, "w") as f:
        json.dump([list(map(str, run)) for run in runs], f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), os.path.join(REPO, "tests", "layout_runs.py"), path]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"layout runs failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_metrics(flags, path, nproc=1):
    """Train with ``flags`` writing ``path``; its train records by iteration (and the process)."""
    proc = run_trainer(list(flags) + ["--metrics-file", str(path)], nproc=nproc)
    return read_metrics(path), proc


def assert_same_run(got, reference, iterations, rel=1e-5, abs=0.0, fields=("lm_loss",), name=""):
    """``got`` reproduces ``reference`` (metrics by iteration) at ``iterations`` in ``fields``."""
    for it in iterations:
        for field in fields:
            assert got[it][field] == pytest.approx(reference[it][field], rel=rel, abs=abs), (name, field, it)


def plan_error(capsys, argv, world_size=1) -> str:
    """The one error line planning ``argv`` gives (it must exit 2 with exactly one line)."""
    from megatron_ext.plan import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(argv, world_size=world_size)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]
