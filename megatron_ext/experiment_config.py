"""OpenSeek-style experiment configs (the FlagScale / Hydra layout of the OpenSeek guides) read into
one training launch: ``megatron-ext run CONFIG.yaml`` (``commands/run.py``).

* The experiment file: ``experiment.exp_name`` (the output folder's name), ``experiment.exp_dir``
  (default: the name), ``experiment.runner.nproc_per_node``, ``experiment.envs``,
  ``experiment.cmds.before_start``, any variable the job file interpolates
  (``experiment.dataset_base_dir``, ``experiment.seed``...), and ``defaults: [_self_, {train: FILE}]``
  naming the job file (looked up in ``train/`` beside the experiment file, then beside it).
* The job file: ``system`` / ``model`` / ``data`` sections whose keys are Megatron flag names with
  underscores (nested groups such as ``precision``, ``logging``, ``optimizer.lr_scheduler`` or
  ``tokenizer`` only group them); ``data.data_path`` is Megatron's ``[weight, prefix, ...]`` list.
* ``${experiment.x}`` (any ``${a.b}``) is OmegaConf's interpolation, as in Hydra.

Every key becomes a flag of the trainer's own parser or is one of the few Megatron-LM settings
listed in ``NO_EFFECT`` (performance or logging details with nothing to do here, each said at start
with the reason); FlagScale runner settings that decide nothing for one node (``RUNNER_NO_EFFECT``)
are said in one note. Two keys that set the same flag must agree (OpenSeek's job files have both
``use_rotary_position_embeddings: true`` and ``position_embedding_type: rope``). Every problem of
the pair is found and reported together, one line each (``ConfigError``), each naming its key;
FlagScale's tokenizer types are tokenizer types of ours (``data/tokenizers.py``,
``FLAGSCALE_TYPES``). The whole command is then planned by the trainer (``plan.build_plan``),
whose messages are said in the config's keys.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from megatron_ext.argtypes import close_hint
from megatron_ext.flag_spelling import FlagSpelling, FlagValueError
from megatron_ext.arguments import build_parser
from megatron_ext.fileio import read_yaml_mapping

JOB_SECTIONS = ("system", "model", "data")
# experiment.* keys with a meaning of their own (the others are variables for ${experiment.x})
EXPERIMENT_KEYS = ("exp_name", "exp_dir", "task", "runner", "cmds", "envs")
RUNNER_KEYS = ("backend", "nnodes", "nproc_per_node", "hostfile")
# FlagScale runner settings that decide nothing for a run here (one node, torchrun on this host with a
# free local rendezvous port, every rank's output in the experiment folder's logs/): accepted, said
# in one note.
RUNNER_NO_EFFECT = ("per_node_task", "no_shared_fs", "rdzv_backend", "rdzv_id", "rdzv_endpoint", "ssh_port",
                    "master_addr", "master_port", "redirects", "tee", "log_dir", "docker")
TOP_KEYS = ("defaults", "experiment", "action", "hydra", *JOB_SECTIONS)
# Job keys spelled otherwise here (FlagScale name -> flag name)
KEY_ALIASES = {"tokenizer_path": "tokenizer_model"}
# The experiment folder decides these (experiment.exp_dir).
OWNED = {"save": "checkpoints", "metrics_file": "metrics.jsonl", "tensorboard_dir": "tensorboard"}

# Megatron-LM keys that change nothing here: accepted, and said at start with the reason. A value
# that would change something (a condition below) is an error instead.
NO_EFFECT: Dict[str, Tuple[str, Optional[Any]]] = {  # key -> (why, the only value accepted, or None: any)
    "transformer_impl": ("the model is megatron-core's local layer spec (no Transformer Engine)", None),
    "no_rope_fusion": ("no fused kernels are used", None),
    "no_position_embedding": ("with rotary positions there is no position-embedding table anyway", None),
    "moe_grouped_gemm": ("the experts run one after the other (same result as grouped GEMM)", None),
    "moe_token_dispatcher_type": ("tokens reach their experts through the all-gather dispatcher (expert "
                                  "parallel 1): the same result as alltoall", None),
    "moe_permute_fusion": ("no fused kernels are used", None),
    "use_distributed_optimizer": ("DeepSpeed ZeRO (--zero-stage, default 1) partitions the optimizer state", None),
    "overlap_grad_reduce": ("communication overlap is DeepSpeed's", None),
    "overlap_param_gather": ("communication overlap is DeepSpeed's", None),
    "accumulate_allreduce_grads_in_fp32": ("gradient precision follows DeepSpeed's bf16/fp16 settings", None),
    "attention_softmax_in_fp32": ("the attention softmax always runs in fp32 here", True),
    "sequence_parallel": ("sequence parallelism only exists with tensor parallelism > 1, which here runs "
                          "without it (Megatron turns it off at tensor-parallel size 1 too)", None),
    "context_parallel_size": ("context parallel size 1 is what runs", 1),
    "no_shared_fs": ("a single-node run", None),
    "no_mmap_bin_files": ("the .bin files are memory-mapped (the same tokens)", None),
    "ckpt_format": ("checkpoints are DeepSpeed checkpoints (docs/checkpoints.md)", None),
    "recompute_method": ("full recomputation is uniform: --recompute-num-layers layers per chunk", "uniform"),
    "tensorboard_log_interval": ("TensorBoard gets every logged iteration (--log-interval)", None),
    "log_timers_to_tensorboard": ("timers are not recorded", None),
    "log_validation_ppl_to_tensorboard": ("validation perplexity is always recorded", None),
    "log_throughput": ("tokens/s and TFLOPs are always logged", None),
    "log_params_norm": ("the parameter norm is not recorded", None),
    "log_num_zeros_in_grad": ("zeros in the gradient are not counted", None),
    "log_memory_to_tensorboard": ("memory is not recorded", None),
    "distributed_timeout_minutes": ("the process group's default timeout is used", None),
    "logging_level": ("log verbosity is fixed", None),
}


class ConfigError(ValueError):
    """A bad experiment or job config: one line per problem, each naming the file and the key."""


def _raise_if(problems: List[str]) -> None:
    if problems:
        raise ConfigError("\n".join(problems))


@dataclasses.dataclass
class Experiment:
    name: str
    folder: str  # absolute
    argv: List[str]  # trainer flags (the folder's paths included)
    nproc: int
    env: Dict[str, str]
    before_start: Optional[str]
    notes: List[str]
    sources: Dict[str, str]  # trainer flag -> the config key it came from
    resolved: Dict[str, Any]  # the merged config, interpolations resolved


def _load_yaml(path: str) -> dict:

    try:
        return read_yaml_mapping(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _job_file(path: str, defaults) -> Tuple[Optional[str], Optional[str]]:
    """(group, job file) named by Hydra's ``defaults`` list (``[_self_, {train: FILE}]``)."""
    if defaults is None:
        return None, None
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: defaults: expected a list like [_self_, {{train: train_x.yaml}}]")
    found = []
    for item in defaults:
        if item == "_self_":
            continue
        if not (isinstance(item, dict) and len(item) == 1):
            raise ConfigError(f"{path}: defaults: {item!r} is not _self_ or {{GROUP: FILE}}")
        (group, name), = item.items()
        found.append((str(group), str(name)))
    if len(found) > 1:
        raise ConfigError(f"{path}: defaults: one job file expected, got {len(found)}")
    if not found:
        return None, None
    group, name = found[0]
    name = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    here = os.path.dirname(os.path.abspath(path))
    for candidate in (os.path.join(here, group, name), os.path.join(here, name)):
        if os.path.isfile(candidate):
            return group, candidate
    raise ConfigError(f"{path}: defaults: {group}: {name}: no such file (looked in {os.path.join(here, group)} "
                      f"and {here})")


def read(path: str, parser: Optional[argparse.ArgumentParser] = None) -> Experiment:
    """The experiment ``path`` (with its job file) as a training launch; ConfigError on anything
    unknown or wrong, naming the key."""
    try:
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:
        raise ConfigError("megatron-ext run needs omegaconf for ${...} interpolation: pip install -e .[experiments]") from None

    raw = _load_yaml(path)
    problems: List[str] = []  # every problem of the pair, reported together
    for key in raw:
        if key not in TOP_KEYS:
            problems.append(f"{path}: {key}: unknown top-level key{close_hint(key, TOP_KEYS)}; known: "
                            f"{', '.join(TOP_KEYS)}")
    group, job_path = _job_file(path, raw.get("defaults"))
    job = _load_yaml(job_path) if job_path else {}
    for key in job:
        if key not in JOB_SECTIONS:
            problems.append(f"{job_path}: {key}: unknown section{close_hint(key, JOB_SECTIONS)}; known: "
                            f"{', '.join(JOB_SECTIONS)}")
    job = {k: v for k, v in job.items() if k in JOB_SECTIONS}
    inline = {k: raw[k] for k in JOB_SECTIONS if k in raw}
    if inline and job:
        problems.append(f"{path}: {', '.join(inline)} given both here and in the job file {job_path}")
    tree = {k: v for k, v in raw.items() if k in TOP_KEYS and k not in ("defaults", "hydra", *JOB_SECTIONS)}
    sections = job or inline
    where = job_path or path
    if group:
        tree[group] = sections
    else:
        tree.update(sections)
    try:
        conf = OmegaConf.create(tree)
        resolved = OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as e:  # nothing can be read past it: the problems so far and this one
        key = getattr(e, "full_key", None) or ""
        msg = str(e).strip().splitlines()[0]
        _raise_if(problems + [f"{where}: {key + ': ' if key else ''}{msg}"])
    exp = resolved.get("experiment") or {}
    if not isinstance(exp, dict):
        _raise_if(problems + [f"{path}: experiment: expected a mapping"])
    job_resolved = resolved.get(group, {}) if group else {k: resolved[k] for k in JOB_SECTIONS if k in resolved}
    experiment = _experiment(path, where, exp, job_resolved, tree, resolved, parser, problems)
    _raise_if(problems)
    return experiment


def _experiment(path, job_where, exp, job, raw_tree, resolved, parser, problems: List[str]) -> Experiment:
    """The launch of the pair; each problem found is added to ``problems``."""
    notes: List[str] = []
    name = exp.get("exp_name")
    if not isinstance(name, str) or not name.strip() or "/" in name:
        problems.append(f"{path}: experiment.exp_name: expected a folder name, got {name!r}")
        name = "experiment"
    used_vars = set(re.findall(r"\$\{experiment\.(\w+)", repr(raw_tree)))  # before interpolation
    for key in exp:
        if key not in EXPERIMENT_KEYS and key not in used_vars:
            problems.append(f"{path}: experiment.{key}: unknown key, and no ${{experiment.{key}}} uses it"
                            f"{close_hint(key, EXPERIMENT_KEYS)}")
    folder = os.path.abspath(str(exp.get("exp_dir") or name))
    task = exp.get("task") or {}
    for key, value in task.items():
        if key == "type" and value != "train":
            problems.append(f"{path}: experiment.task.type: {value!r}: only train runs here")
        if key == "backend" and value != "megatron":
            problems.append(f"{path}: experiment.task.backend: {value!r}: this trainer is megatron-core's")
        if key == "entrypoint":
            notes.append(f"experiment.task.entrypoint {value}: megatron_ext.train runs instead")
        elif key not in ("type", "backend", "entrypoint"):
            problems.append(f"{path}: experiment.task.{key}: unknown key")
    runner = exp.get("runner") or {}
    for key in runner:
        if key not in RUNNER_KEYS and key not in RUNNER_NO_EFFECT:
            problems.append(f"{path}: experiment.runner.{key}: unknown key"
                            f"{close_hint(key, RUNNER_KEYS + RUNNER_NO_EFFECT)}")
    inert = [key for key in runner if key in RUNNER_NO_EFFECT]
    if inert:
        notes.append(f"experiment.runner: {', '.join(inert)}: no effect here (one node: torchrun on this host, "
                     "rendezvous on a free local port, every rank's output in the experiment folder's logs/)")
    if runner.get("backend", "torchrun") != "torchrun":
        problems.append(f"{path}: experiment.runner.backend: {runner['backend']!r}: runs use torchrun")
    if runner.get("nnodes", 1) != 1 or runner.get("hostfile"):
        problems.append(f"{path}: experiment.runner: one node only (nnodes 1, no hostfile); several nodes: "
                        "train_alcf.sh with a HOSTFILE (mpiexec)")
    nproc = runner.get("nproc_per_node", 1)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        problems.append(f"{path}: experiment.runner.nproc_per_node: expected a positive integer, got {nproc!r}")
        nproc = 1
    cmds = exp.get("cmds") or {}
    for key in cmds:
        if key != "before_start":
            problems.append(f"{path}: experiment.cmds.{key}: unknown key (before_start runs before the training)")
    envs = exp.get("envs") or {}
    if not isinstance(envs, dict):
        problems.append(f"{path}: experiment.envs: expected a mapping VARIABLE: value")
        envs = {}
    env = {str(k): "" if v is None else str(v) for k, v in envs.items()}

    if parser is None:

        parser = build_parser()
    argv, sources = job_flags(job_where, job, parser, notes, problems)
    paths = {dest: os.path.join(folder, name) for dest, name in OWNED.items()}
    for dest, path in paths.items():
        argv += ["--" + dest.replace("_", "-"), path]
    if "--load" not in sources:  # the same command resumes the experiment
        argv += ["--load", paths["save"]]
    return Experiment(name=name, folder=folder, argv=argv, nproc=nproc, env=env,
                      before_start=cmds.get("before_start"), notes=notes, sources=sources, resolved=resolved)


def _flatten(tree: dict, prefix: str) -> List[Tuple[str, str, Any]]:
    """(key path, leaf key, value) of every leaf; a nested mapping only groups keys."""
    out = []
    for key, value in tree.items():
        full = f"{prefix}.{key}"
        if isinstance(value, dict):
            out += _flatten(value, full)
        else:
            out.append((full, str(key), value))
    return out


def job_flags(where: str, job: dict, parser, notes: List[str],
              problems: Optional[List[str]] = None) -> Tuple[List[str], Dict[str, str]]:
    """The trainer flags of the job sections, and which key each flag came from. Each problem is
    added to ``problems`` (without it: raised together at the end)."""
    collect = problems if problems is not None else []
    actions = parser._option_string_actions
    spelling = FlagSpelling(parser)
    argv: List[str] = []
    sources: Dict[str, str] = {}
    seen: Dict[str, Tuple[str, Any]] = {}  # destination -> (the key that set it, its value)
    for section in JOB_SECTIONS:
        block = job.get(section) or {}
        if not isinstance(block, dict):
            collect.append(f"{where}: {section}: expected a mapping of flag names")
            continue
        for path, key, value in _flatten(block, section):
            key = KEY_ALIASES.get(key, key)
            option = "--" + key.replace("_", "-")
            owned = OWNED.get(actions[option].dest if option in actions else key)  # aliases too (--output-dir)
            if owned:
                collect.append(f"{where}: {path}: the experiment folder holds the {owned} "
                               "(experiment.exp_dir decides where)")
                continue
            if value is None:  # null: unset (Megatron's default)
                continue
            if option not in actions:
                if key in NO_EFFECT:
                    why, only = NO_EFFECT[key]
                    if only is not None and value != only:
                        collect.append(f"{where}: {path}: {value!r} is not supported here ({why})")
                    else:
                        notes.append(f"{path}: no effect here: {why}")
                    continue
                if key == "recompute_granularity":
                    if value != "full":
                        collect.append(f"{where}: {path}: {value!r}: only full recomputation "
                                       "(--recompute-activations) is supported")
                        continue
                    option, value = "--recompute-activations", True
                else:
                    known = [o[2:].replace("-", "_") for o in actions if o.startswith("--")]
                    collect.append(f"{where}: {path}: not a training flag{close_hint(key, known)}")
                    continue
            action = actions[option]
            try:
                tokens = spelling.flags(option, value, name=path)
                given = _value_of(tokens, action, parser)
            except FlagValueError as e:
                collect.append(f"{where}: {e}")
                continue
            except argparse.ArgumentError as e:  # the trainer's own type or choice check of the value
                collect.append(f"{where}: {path} ({option}): {e.message}")
                continue
            if action.dest in seen:  # two keys for one flag: accepted when they agree
                first, first_value = seen[action.dest]
                if given != first_value:
                    collect.append(f"{where}: {path}: sets {option} to {given!r}, but {first} set it to "
                                   f"{first_value!r}")
                continue
            seen[action.dest] = (path, given)
            argv += tokens
            if tokens:
                sources[tokens[0]] = path
    if problems is None:
        _raise_if(collect)
    return argv, sources


def _value_of(tokens: List[str], action, parser):
    """What ``tokens`` (one flag and its values; none: the default) give the flag's destination,
    converted by the parser's own type and choices (argparse.ArgumentError for a bad value)."""
    if not tokens:
        return parser.get_default(action.dest)
    action = parser._option_string_actions[tokens[0]]
    if action.nargs == 0:
        if isinstance(action, argparse.BooleanOptionalAction):
            return not tokens[0].startswith("--no-")
        return action.const
    return parser._get_values(action, tokens[1:])


def say_in_keys(message: str, sources: Dict[str, str]) -> str:
    """A trainer message about flags, said in the config keys that set them (``--lr`` ->
    ``model.optimizer.lr_scheduler.lr (--lr)``)."""
    for flag in sorted(sources, key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", f"{sources[flag]} ({flag})", message)
    return message
