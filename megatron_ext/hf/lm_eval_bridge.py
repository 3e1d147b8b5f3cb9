"""``megatron-ext eval CHECKPOINT --tasks ...``: EleutherAI lm-evaluation-harness on a checkpoint.

How: the checkpoint is exported (``export.py``) to a temporary folder (or ``--export-dir``, kept
and reused), and lm_eval runs its own Hugging Face model class (``hf``) on it. Not an lm_eval
model class over our megatron-core model: lm_eval's ``hf`` class is the path the harness is
developed and checked on (tokenisation at context/continuation boundaries, batching, generation,
its published numbers), the export is verified to compute our model's logits (``--verify`` of
export-hf, tests), and evaluating needs neither DeepSpeed, torch.distributed nor our TP layout.
The cost is one export (seconds for small models, the model size in temporary disk).

Offline, always: ``HF_HUB_OFFLINE`` and ``HF_DATASETS_OFFLINE`` are set, so a task whose data is
not in the local ``datasets`` cache fails in one line before anything is exported. Local data:

* ``--task-data TASK=FILE``: a built-in task on a local file (json/jsonl/csv/parquet) holding the
  rows of the split the task evaluates: a YAML that includes the built-in one and replaces its
  dataset with the file is generated. A hellaswag file lacking fields the task reads is one line
  naming them (``TASK_FIELDS``).
* ``--include-path DIR``: your own task YAMLs (lm_eval's ``--include_path``).
* ``--mc-file FILE.jsonl``: the trainer's ``--eval-mc-file`` set (HellaSwag's jsonl format) as a
  task named ``mc_<file stem>``, built with the trainer's own parser and the text it scores (a
  file in HellaSwag's full format: lm-eval's hellaswag context and endings; otherwise the
  end-of-document token, the context, a space, the ending), so lm_eval's ``acc`` and ``acc_norm``
  are the trainer's ``acc`` and ``acc_norm``.

Results (lm_eval's JSON) are written next to the checkpoint: ``<run dir>/lm_eval_<tag>_<time>.json``
(for a Hugging Face folder: inside it), or to ``--output``.
"""
from __future__ import annotations

import dataclasses
import datetime
import glob
import json
import os
import re
import shutil
import tempfile
import time
from typing import Callable, Dict, List, Optional

from megatron_ext.argtypes import close_hint
from megatron_ext.hf import HFError, require
from megatron_ext.training import hellaswag
from megatron_ext.hf import checkpoint_reader
from megatron_ext.hf.checkpoint_reader import saved_args
from megatron_ext.hf.export import ExportOptions, export
from megatron_ext.hf.export import RECORD
from megatron_ext.hf.tokenizer_export import training_tokenizer
from megatron_ext.training.evaluation import HELLASWAG, _joined, read_mc_file
from megatron_ext.training.evaluation import read_mc_file

RESULT_PREFIX = "lm_eval_"
# The fields a built-in task reads from every row of a --task-data file (checked before loading).
TASK_FIELDS = {"hellaswag": hellaswag.FIELDS}


@dataclasses.dataclass
class EvalOptions:
    target: str  # a checkpoint / run directory, or a Hugging Face folder
    tasks: List[str]
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    batch_size: str = "1"
    device: Optional[str] = None
    dtype: Optional[str] = None
    task_data: List[str] = dataclasses.field(default_factory=list)  # TASK=FILE
    include_path: List[str] = dataclasses.field(default_factory=list)
    mc_file: List[str] = dataclasses.field(default_factory=list)
    output: Optional[str] = None
    export_dir: Optional[str] = None
    log_samples: bool = False
    tokenizer_model: Optional[str] = None
    logits_cache: bool = False


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and bool(
        glob.glob(os.path.join(glob.escape(path), "*.safetensors")) or glob.glob(os.path.join(glob.escape(path), "*.bin")))


def builtin_task_yaml(task: str) -> str:
    """The YAML of lm_eval's built-in ``task`` (a text search: indexing every task takes many seconds)."""
    import lm_eval

    root = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    pattern = re.compile(rf"^task:\s*['\"]?{re.escape(task)}['\"]?\s*$", re.MULTILINE)
    for path in sorted(glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True)):
        with open(path, encoding="utf-8", errors="replace") as f:
            if pattern.search(f.read()):
                return path
    raise HFError(f"--task-data {task}=...: no built-in lm_eval task named {task}")


def _split_of(yaml_path: str) -> str:
    """The split a built-in task evaluates on (test, else validation), read from its YAML lines."""
    text = open(yaml_path, encoding="utf-8").read()
    for key in ("test_split", "validation_split"):
        m = re.search(rf"^{key}:\s*(\S+)\s*$", text, re.MULTILINE)
        if m and m.group(1) not in ("null", "None", "~"):
            return m.group(1)
    return "test"


def write_task_data_yaml(task: str, data_file: str, folder: str) -> None:
    include = builtin_task_yaml(task)
    data_file = os.path.abspath(data_file)
    if not os.path.isfile(data_file):
        raise HFError(f"--task-data {task}={data_file}: no such file")
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(
        os.path.splitext(data_file)[1].lower())
    if kind is None:
        raise HFError(f"--task-data {task}={data_file}: give a .jsonl, .json, .csv or .parquet file")
    _check_rows(task, data_file)
    split = _split_of(include)
    with open(os.path.join(folder, f"{task}.yaml"), "w") as f:
        json.dump({"include": include, "task": task, "dataset_path": kind, "dataset_name": None,
                   "dataset_kwargs": {"data_files": {split: data_file}}, "training_split": None,
                   "fewshot_split": split}, f, indent=2)  # JSON is YAML; lm_eval reads it as such


def _check_rows(task: str, data_file: str) -> None:
    """HFError naming the first row of a json/jsonl ``data_file`` that lacks a field ``task`` reads."""
    fields = TASK_FIELDS.get(task)
    if fields is None or not data_file.lower().endswith((".jsonl", ".json")):
        return
    with open(data_file, encoding="utf-8") as f:
        text = f.read()
    try:
        rows = json.loads(text)  # a JSON array of rows
        rows = [(n, row) for n, row in enumerate(rows, 1)] if isinstance(rows, list) else None
        what = "row"
    except json.JSONDecodeError:
        rows = None
    if rows is None:  # JSON lines
        rows, what = [], "line"
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise HFError(f"--task-data {task}={data_file}: line {n}: malformed JSON ({e.msg})") from None
    for n, row in rows:
        missing = [name for name in fields if not isinstance(row, dict) or name not in row]
        if missing:
            raise HFError(f"--task-data {task}={data_file}: {what} {n} lacks {', '.join(missing)}; lm_eval's {task} "
                          f"task reads {', '.join(fields)} from every row")


def write_mc_task(mc_file: str, prefix: str, folder: str) -> str:
    """A task over the trainer's --eval-mc-file set: its examples as the trainer reads them (a file in
    HellaSwag's full format: lm-eval's hellaswag task's context and endings; otherwise the context
    after ``prefix``, the end-of-document token's text). Returns the task name."""

    examples = read_mc_file(os.path.abspath(mc_file))
    lm_eval_rule = examples[0].rule == HELLASWAG
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(mc_file))[0])
    name = stem if stem.startswith("mc_") else f"mc_{stem}"
    rows = os.path.join(folder, f"{name}.jsonl")
    with open(rows, "w") as f:
        for e in examples:
            if lm_eval_rule:  # the hellaswag task's own request: no token before the context, " " + ending
                f.write(json.dumps({"query": e.context, "choices": e.endings, "gold": e.label}) + "\n")
                continue
            # The trainer's text exactly: the joining space belongs to each choice (none after an empty
            # context or one that ends in whitespace), so the task's target delimiter is empty.
            choices = [_joined(e.context, ending)[len(e.context):] for ending in e.endings]
            f.write(json.dumps({"query": prefix + e.context, "choices": choices, "gold": e.label}) + "\n")
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": rows}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{query}}",
            "doc_to_target": "{{gold}}", "doc_to_choice": "choices",
            "target_delimiter": hellaswag.TARGET_DELIMITER if lm_eval_rule else "",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm", "acc_bytes")],
            "metadata": {"version": 1.0, "source": os.path.abspath(mc_file)}}
    with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
        json.dump(task, f, indent=2)
    return name


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _task_manager(lm_eval_tasks, include: List[str], tasks: List[str]):
    """lm_eval's TaskManager: only the include paths when they define every task asked for (indexing
    the built-in tasks takes many seconds), else the built-in tasks too; unknown names refused."""
    manager = lm_eval_tasks.TaskManager(include_path=include or None, include_defaults=False) if include else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = lm_eval_tasks.TaskManager(include_path=include or None)
    known = manager.all_tasks
    for t in tasks:
        if t not in known:
            raise HFError(f"--tasks {t}: no such lm_eval task{close_hint(t, known, most=3, quote=False)}")
    return manager


def _load_tasks(manager, tasks: List[str]) -> None:
    """Load every task's data now (offline), so missing data stops the run before the export."""
    for t in tasks:
        try:
            manager.load([t])
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds for "not available offline"
            if isinstance(e, KeyError):  # the task's own code reading a row
                raise HFError(f"task {t}: a row of its data lacks the field {e} that lm_eval's {t} task reads "
                              "(give the rows as the task's hub dataset has them)") from None
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HFError(f"task {t}: its data cannot be loaded offline ({type(e).__name__}: {detail[:200]}); "
                          f"give a local file with --task-data {t}=FILE or a task YAML with --include-path "
                          "(docs/huggingface.md)") from None


def run_eval(options: EvalOptions, say: Callable[[str], None] = print) -> Dict:
    _offline()

    require("lm_eval", extra="eval")
    import lm_eval
    from lm_eval import tasks as lm_eval_tasks
    from lm_eval.utils import handle_non_serializable

    target = os.path.abspath(os.path.expanduser(options.target))
    if not os.path.isdir(target):
        raise HFError(f"{target}: no such checkpoint or model directory")
    hf_folder = target if is_hf_folder(target) else None
    tag_dir = None if hf_folder else checkpoint_reader.locate(target)
    if tag_dir is not None:
        _check_tokenizer(tag_dir, options)
    for path in options.include_path:
        if not os.path.isdir(path):
            raise HFError(f"--include-path {path}: no such directory")
    for mc in options.mc_file:

        try:
            read_mc_file(os.path.abspath(mc))  # bad lines stop here, before the export
        except ValueError as e:
            raise HFError(f"--mc-file {e}") from None
    pairs = []
    for item in options.task_data:
        task, sep, data = item.partition("=")
        if not sep or not task or not data:
            raise HFError(f"--task-data {item!r}: expected TASK=FILE")
        pairs.append((task, data))
    work = tempfile.mkdtemp(prefix="megatron-ext-eval.")
    start = time.time()
    try:
        include = os.path.join(work, "tasks")
        os.makedirs(include)
        for task, data in pairs:
            write_task_data_yaml(task, data, include)
        requested = list(dict.fromkeys(options.tasks))
        named = [t for t in requested if t]
        if named:  # names and data checked before exporting
            manager = _task_manager(lm_eval_tasks, [include] + list(options.include_path), named)
            _load_tasks(manager, named)
        if hf_folder is None:
            folder = options.export_dir or os.path.join(work, "model")
            folder = _export_or_reuse(folder, tag_dir, options, export, ExportOptions, say)
        else:
            folder = hf_folder
        if options.mc_file:
            tokenizer = require("transformers").AutoTokenizer.from_pretrained(folder, local_files_only=True)
            for mc in options.mc_file:
                requested.append(write_mc_task(mc, tokenizer.eos_token or "", include))
        if not requested:
            raise HFError("nothing to evaluate: give --tasks and/or --mc-file")
        manager = _task_manager(lm_eval_tasks, [include] + list(options.include_path), requested)
        device = options.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
        # logits_cache off unless asked: lm_eval 0.4.13's cache returns a wrong log-likelihood for a request
        # whose context + continuation[:-1] equals another's split elsewhere (docs/huggingface.md).
        model_args = {"pretrained": folder, "dtype": {"bf16": "bfloat16", "fp16": "float16"}.get(options.dtype, "float32"),
                      "logits_cache": options.logits_cache}
        say(f"lm_eval on {folder}: tasks {', '.join(requested)} (device {device}"
            + (f", limit {options.limit:g}" if options.limit is not None else "") + ")")
        results = lm_eval.simple_evaluate(
            model="hf", model_args=model_args, tasks=requested, num_fewshot=options.num_fewshot,
            batch_size=options.batch_size, device=device, limit=options.limit, task_manager=manager,
            log_samples=options.log_samples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["megatron_ext"] = {"target": target, "checkpoint": tag_dir, "model_folder": folder if options.export_dir
                               or hf_folder else "(temporary export)", "seconds": round(time.time() - start, 1)}
    output = options.output or _default_output(tag_dir, hf_folder)
    with open(output, "w") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable)
    return {"output": output, "results": results.get("results", {}), "tasks": requested,
            "seconds": results["megatron_ext"]["seconds"]}


def _export_or_reuse(folder: str, tag_dir: str, options: EvalOptions, export, ExportOptions, say) -> str:
    """Export into ``folder``, or reuse it when it already holds this checkpoint's export."""

    record = os.path.join(folder, RECORD)
    if os.path.isfile(record):
        with open(record) as f:
            if json.load(f).get("source") == tag_dir:
                say(f"reusing the export of {tag_dir} in {folder}")
                return folder
    say(f"exporting {tag_dir} to {folder}")
    export(ExportOptions(checkpoint=tag_dir, out_dir=folder, dtype=options.dtype,
                         tokenizer_model=options.tokenizer_model), say)
    return folder


def _check_tokenizer(tag_dir: str, options: EvalOptions) -> None:
    """lm_eval reads text: the checkpoint must come with its tokenizer (found before any export)."""

    tok, _, reason = training_tokenizer(saved_args(tag_dir), tokenizer_model=options.tokenizer_model)
    if tok is None:
        raise HFError(f"{tag_dir}: lm_eval needs a tokenizer, and {reason}")


def _default_output(tag_dir: Optional[str], hf_folder: Optional[str]) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if tag_dir:
        base = os.path.join(os.path.dirname(tag_dir), f"{RESULT_PREFIX}{os.path.basename(tag_dir)}_{stamp}")
    else:
        base = os.path.join(hf_folder, f"{RESULT_PREFIX}{stamp}")
    path, n = base + ".json", 1
    while os.path.exists(path):  # never replace an earlier result
        n += 1
        path = f"{base}_{n}.json"
    return path
