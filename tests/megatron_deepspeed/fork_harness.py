"""Test harness for the Megatron-DeepSpeed fixture (the ALCF fork, pinned): a runnable copy of it,
its data, and helpers to run it (alone or with megatron_ext's plug-ins) and our trainer.

``prepare(tmp)`` (once per test session, ~20 s): copies the fixture (its folder may be read-only),
builds its C++ data helpers (``make -C megatron/data``: g++ and pybind11), and tokenizes a small
corpus (this repository's documentation) with the fork's own ``tools/preprocess_data.py`` and its
Llama-2 SentencePiece model. Its four imports that the package index cannot satisfy come from
``standins/`` (README there), first on ``PYTHONPATH``.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
STANDINS = os.path.join(HERE, "standins")
RECORDER = os.path.join(HERE, "record_run.py")
FIXTURE_ENV = "MEGATRON_DEEPSPEED_FIXTURE"
DEFAULT_FIXTURE = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "megatron-deepspeed-alcf")
# The packages the fork imports at module level (the `test` extra of setup.py installs them).
FORK_IMPORTS = ("tensorboard", "nltk", "pybind11", "regex", "six", "einops", "yaml", "rich", "transformers", "wandb",
                "sentencepiece")

MICRO, GLOBAL = 4, 4
# FIXTURE.md's tiny llama (2 layers, hidden 64, GQA 4/2 heads, seq 64), one CPU process.
TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176", "--num-attention-heads", "4",
    "--num-key-value-heads", "2", "--seq-length", "64", "--max-position-embeddings", "64", "--swiglu",
    "--normalization", "rmsnorm", "--disable-bias-linear", "--no-query-key-layer-scaling",
    "--use-rotary-position-embeddings", "--untie-embeddings-and-output-weights", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-masked-softmax-fusion",
    "--no-gradient-accumulation-fusion", "--micro-batch-size", str(MICRO), "--global-batch-size", str(GLOBAL),
    "--tokenizer-type", "Llama2Tokenizer", "--split", "990,10,0", "--deepspeed", "--distributed-backend", "gloo",
    "--no-pipeline-parallel", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1",
    "--weight-decay", "0.01", "--lr", "1e-3", "--min-lr", "1e-5", "--lr-warmup-iters", "2",
]
# The same model and data for our trainer (it defaults to this architecture's llama style).
OURS_TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176", "--num-attention-heads", "4",
    "--num-key-value-heads", "2", "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", str(MICRO), "--global-batch-size", str(GLOBAL), "--tokenizer-type", "Llama2Tokenizer",
    "--split", "990,10,0", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1",
    "--weight-decay", "0.01", "--lr", "1e-3", "--min-lr", "1e-5", "--lr-warmup-iters", "2",
]


def fixture_dir() -> str:
    return os.path.abspath(os.environ.get(FIXTURE_ENV) or DEFAULT_FIXTURE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def noise_free(stderr: str) -> List[str]:
    """The lines of a failed run's stderr that are not Python warnings (nor the source line a
    warning echoes after it)."""
    out, skip_next = [], False
    for line in stderr.splitlines():
        if skip_next:
            skip_next = False
            continue
        if "Warning" in line or "warnings.warn" in line:
            skip_next = True
            continue
        if line.strip() and "[WARNING]" not in line:
            out.append(line)
    return out


@dataclasses.dataclass
class Run:
    proc: subprocess.CompletedProcess
    records: List[dict]  # one per logged iteration (record_run.py)
    reports: List[Optional[dict]]  # MEGATRON_EXT_REPORT of every rank

    @property
    def report(self) -> Optional[dict]:
        return self.reports[0]

    @property
    def losses(self) -> Dict[int, float]:
        return {r["iteration"]: r["loss"] for r in self.records}

    @property
    def lrs(self) -> Dict[int, float]:
        return {r["iteration"]: r["lr"] for r in self.records}


class Fork:
    """A runnable copy of the fixture."""

    def __init__(self, root: str, work: str, data_prefix: str):
        self.root, self.work, self.data_prefix = root, work, data_prefix
        self._runs = 0

    def ds_config(self, zero_stage: int = 1, bf16: bool = False, micro: int = MICRO) -> str:
        """DeepSpeed's JSON for the run (it derives the accumulation steps from the batch sizes and
        the data-parallel size)."""
        path = os.path.join(self.work, f"ds_zero{zero_stage}{'_bf16' if bf16 else ''}_micro{micro}.json")
        if not os.path.exists(path):
            config = {"train_batch_size": GLOBAL, "train_micro_batch_size_per_gpu": micro,
                      "zero_optimization": {"stage": zero_stage},
                      "gradient_clipping": 1.0, "steps_per_print": 100000, "wall_clock_breakdown": False}
            if bf16:
                config["bf16"] = {"enabled": True}
            with open(path, "w") as f:
                json.dump(config, f)
        return path

    def env(self, extra: Optional[dict] = None) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("MEGATRON_EXT_PLUGINS", "MEGATRON_EXT_REPORT")}
        env.update(PYTHONPATH=os.pathsep.join([STANDINS, REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1",
                   LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        # DeepSpeed compiles its CPU shared-memory comm op at start-up into torch's extension cache; a
        # cache of this environment's own (its build command names this environment's paths, so a
        # cache shared with other environments is rebuilt, minutes, whenever another one used it last)
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
        env.update(extra or {})
        return env

    def entry_with_install(self) -> str:
        """An entry point of the user's own that switches the plug-ins on with ``install()`` (a new
        file in the copy; the fork's files are untouched)."""
        path = os.path.join(self.root, "train_with_plugins.py")
        with open(path, "w") as f:
            f.write("import megatron_ext.megatron_deepspeed\n"
                    "megatron_ext.megatron_deepspeed.install('all')\n"
                    "import runpy\n"
                    "runpy.run_path('pretrain_gpt_alcf.py', run_name='__main__')\n")
        return path

    def run(self, flags: List[str], *, plugins: Optional[str] = None, via: str = "env", iters: int = 20,
            zero_stage: int = 1, nproc: int = 1, pipeline_model: bool = False, bf16: bool = False,
            micro: int = MICRO, tied: bool = False, check: bool = True, timeout: int = 600) -> Run:
        """``pretrain_gpt_alcf.py`` on the tiny model and the test corpus, ``flags`` last (they win).
        ``plugins``: None (the fork alone) or a mode; ``via``: how they are switched on: ``env``
        (MEGATRON_EXT_PLUGINS and the start-up hook), ``module`` (``python -m
        megatron_ext.megatron_deepspeed``) or ``install`` (an entry point calling ``install()``).
        ``pipeline_model``: the fork's GPTModelPipe (its default) instead of ``--no-pipeline-parallel``;
        ``bf16``: ``--bf16`` and a DeepSpeed config with bf16 on; ``micro``: the micro-batch size (the
        global batch stays GLOBAL: 2 for two data-parallel ranks); ``tied``: the output layer tied to
        the word embedding (TINY's flag unties them, and the fork has no flag to tie them back)."""
        self._runs += 1
        out = os.path.join(self.work, f"run{self._runs}.jsonl")
        report = os.path.join(self.work, f"run{self._runs}.report.{{rank}}.json")
        extra = {"MEGATRON_EXT_REPORT": report}
        target = ["pretrain_gpt_alcf.py"]
        if plugins is not None and via == "env":
            extra["MEGATRON_EXT_PLUGINS"] = plugins
        elif plugins is not None and via == "module":
            target = ["-m", "megatron_ext.megatron_deepspeed", "--plugins", plugins, "pretrain_gpt_alcf.py"]
        elif plugins is not None and via == "install":
            target = [os.path.basename(self.entry_with_install())]
        dropped = {"--no-pipeline-parallel": pipeline_model, "--untie-embeddings-and-output-weights": tied}
        tiny = [f for f in TINY if not dropped.get(f)]
        argv = [RECORDER, out, *target, *tiny, "--train-iters", str(iters), "--data-path", self.data_prefix,
                "--tokenizer-model", os.path.join(self.root, "ALCF", "tokenizer.model"),
                "--deepspeed_config", self.ds_config(zero_stage, bf16, micro), "--zero-stage", str(zero_stage),
                "--micro-batch-size", str(micro), *(["--bf16"] if bf16 else []), *flags]
        env = self.env(extra)
        cmd = launch_command(argv, nproc, env)
        proc = run_process_tree(cmd, cwd=self.root, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"fork run failed ({proc.returncode}): {' '.join(cmd[1:])}\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        records = [json.loads(line) for line in open(out)] if os.path.exists(out) else []
        reports = [report.replace("{rank}", str(rank)) for rank in range(nproc)]
        return Run(proc, records, [json.load(open(r)) if os.path.exists(r) else None for r in reports])

    def run_ours(self, flags: List[str], *, iters: int = 20, nproc: int = 1, check: bool = True, timeout: int = 600):
        """Our trainer on the same model and data (``nproc`` gloo ranks under torchrun); returns
        ``{iteration: (loss, lr)}`` from metrics.jsonl."""
        save = next(flags[i + 1] for i, f in enumerate(flags) if f == "--save")
        argv = ["-m", "megatron_ext.train", *OURS_TINY, "--train-iters", str(iters),
                "--data-path", self.data_prefix, "--tokenizer-model", os.path.join(self.root, "ALCF", "tokenizer.model"),
                # megatron-core would otherwise create <prefix>/cache/, which the fork's pretrain_gpt_alcf.py
                # then takes for a directory of datasets (docs/megatron_deepspeed.md)
                "--data-cache-path", os.path.join(self.work, "ours-index-cache"), *flags]
        env = self.env()
        proc = run_process_tree(launch_command(argv, nproc, env), cwd=self.work, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"our trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        metrics = {}
        path = os.path.join(save, "metrics.jsonl")
        if os.path.exists(path):
            for line in open(path):
                r = json.loads(line)
                if r["split"] == "train":
                    metrics[r["iteration"]] = (r["lm_loss"], r["learning_rate"])
        return proc, metrics

    def megatron_ext(self, *args, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "megatron_ext.cli", *args], cwd=self.work, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"megatron-ext {args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
        return proc


def launch_command(argv: List[str], nproc: int, env: dict) -> List[str]:
    """``python argv`` for one process, else under torchrun (``env`` then loses the one-process rank
    variables torchrun sets per rank)."""
    if nproc == 1:
        return [sys.executable, *argv]
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", env["MASTER_PORT"], *argv]


def run_process_tree(cmd: List[str], timeout: int, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run``, but on timeout every descendant is killed too: torchrun's ranks (process
    groups of their own) and their data-loader workers would outlive a killed launcher, e.g. ranks
    waiting in a collective."""
    import psutil  # a DeepSpeed dependency

    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = psutil.Process(proc.pid)
            for process in [tree, *tree.children(recursive=True)]:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
            out, err = proc.communicate()
            raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd[1:])}\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def checkpoint_at(save: str, iteration: int, copy: str) -> str:
    """A load directory holding only ``save``'s checkpoint at ``iteration``."""
    os.makedirs(copy)
    shutil.copytree(os.path.join(save, f"global_step{iteration}"), os.path.join(copy, f"global_step{iteration}"))
    for name, text in (("latest", f"global_step{iteration}"), ("latest_checkpointed_iteration.txt", str(iteration))):
        with open(os.path.join(copy, name), "w") as f:
            f.write(text)
    return copy


def check_packages() -> Optional[str]:
    import importlib.util

    missing = [m for m in FORK_IMPORTS if importlib.util.find_spec(m) is None]
    if missing:
        return (f"the Megatron-DeepSpeed fixture imports {', '.join(missing)}: install the test extra "
                "(pip install -e '.[test]')")
    return None


def prepare(work: str) -> Fork:
    """The session's runnable fork (see the module docstring)."""
    source = fixture_dir()
    root = os.path.join(work, "Megatron-DeepSpeed")
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("__pycache__", "trace", "*.so"))
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # its Makefile runs python3
    subprocess.run(["make", "-C", os.path.join(root, "megatron", "data")], env=env, check=True, capture_output=True)
    data = os.path.join(work, "data")
    os.makedirs(data)
    corpus = os.path.join(work, "corpus.jsonl")
    with open(corpus, "w") as f:
        for path in sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))) + [os.path.join(REPO, "README.md")]:
            for paragraph in open(path, encoding="utf-8").read().split("\n\n"):
                if len(paragraph) > 200:
                    f.write(json.dumps({"text": paragraph}) + "\n")
    fork = Fork(root, work, os.path.join(data, "corpus_text_document"))
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", corpus, "--output-prefix",
                    os.path.join(data, "corpus"), "--tokenizer-type", "GPTSentencePieceTokenizer",
                    "--tokenizer-model", os.path.join(root, "ALCF", "tokenizer.model"), "--append-eod",
                    "--workers", "1"], cwd=root, env=fork.env(), check=True, capture_output=True, timeout=300)
    return fork
