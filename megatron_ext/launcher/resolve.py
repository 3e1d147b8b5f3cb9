"""Environment variables of ``train_alcf.sh`` -> trainer flags, DeepSpeed config, launch command.

Every variable of Megatron-DeepSpeed's ``train_alcf.sh`` is read with its documented default, both
spellings where its docs and script disagree. Extra command-line arguments are appended AFTER the
generated flags, so they always win (argparse keeps the last value). The final argument list is
parsed once by the trainer's own parser and planned by the trainer's run plan
(``megatron_ext.plan``), which does every derivation (batch, accumulation, iterations from
TRAIN_TOKENS, ZeRO stage with a user DeepSpeed JSON...) and every check; the table shows the plan's
values, so what is printed is what will run. Numbers reach the trainer exactly as typed. Any bad
value is one line naming the variable (``LaunchError``; the plan's messages name flags, said here
in the variables that produced them), before anything starts.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import shutil
import sys
from typing import Dict, List, Optional, Tuple

from megatron_ext.argtypes import TRUE_WORDS, close_hint
from megatron_ext.launcher.demo import data_file_list as demo_data_file_list
from megatron_ext.launcher.presets import MODEL_PRESETS, preset_name
from megatron_ext.arguments import ArgumentsError
from megatron_ext.arguments import build_parser
from megatron_ext.arguments import normalise_argv
from megatron_ext.launcher.layout import layout_rows
from megatron_ext.models.features.moe_mtp import VALUE_TYPES
from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.plan import build_plan
from megatron_ext.plan import parse_or_problem
from megatron_ext.planning import launch_problem
from megatron_ext.platform.accelerator import _accel, accelerator_name
from megatron_ext.registry import UnknownPluginError
from megatron_ext.schedules import SCHEDULES

DEFAULT_TRAIN_TOKENS = 2_000_000_000_000  # Megatron-DeepSpeed's train_alcf.sh default
# With no DATA_FILE_LIST the launcher runs the demo; these replace the documented defaults there
# (and only there) so a tiny model learns visibly in a few CPU minutes.
DEMO_DEFAULTS = {"MICRO_BATCH": 8, "LR": 1e-3, "EVAL_INTERVAL": 250, "EVAL_ITERS": 10, "SAVE_INTERVAL": 250,
                 "LOG_INTERVAL": 25}
DEMO_TRAIN_ITERS = 1000  # when neither TRAIN_ITERS nor TRAIN_TOKENS is given
DEFAULT_HF_TOKENIZER = "google/gemma-7B"  # the ALCF fork's train_alcf.sh default for HFTokenizer
# Megatron-DeepSpeed's train_alcf.sh defaults of the number variables that have no preset.
LAUNCHER_DEFAULTS = {"LR": 0.0002, "LR_WARMUP_FRAC": 0.05, "ADAM_BETA1": 0.9, "ADAM_BETA2": 0.95, "ADAM_EPS": 1e-5,
                     "WEIGHT_DECAY": 0.1, "CLIP_GRAD": 1.0, "MICRO_BATCH": 1, "EVAL_INTERVAL": 100, "EVAL_ITERS": 20,
                     "LOG_INTERVAL": 1, "SAVE_INTERVAL": 50, "SEED": 1234,
                     "TRAIN_SPLIT": "990", "VAL_SPLIT": "10", "TEST_SPLIT": "0"}


class LaunchError(ValueError):
    """Bad launcher input; the message is one line naming the variable."""


@dataclasses.dataclass
class Launch:
    settings: List[Tuple[str, str, str]]  # (setting, value, where it came from)
    env: Dict[str, str]  # resolved variables, written to <run dir>/.env
    trainer_argv: List[str]
    command: List[str]
    run_dir: str
    ds_config: Optional[dict]  # generated config (None when DS_CONFIG is the user's)
    ds_config_path: str
    notes: List[str]
    plan: object  # megatron_ext.plan.RunPlan: what the trainer will do
    files_checked: bool  # whether the plan resolved the tokenizer and data files (not for a demo yet to build)
    refusal: Optional[str] = None  # the memory plan's one line when the run cannot fit (the launch refuses it)
    demo_corpus: Optional[dict] = None  # the demo's build (launcher.demo.prepare's arguments); None without the demo


class _Env:
    """Reads variables; ``defaults`` replaces documented defaults (the demo's)."""

    def __init__(self, env: Dict[str, str], defaults: Optional[Dict[str, float]] = None):
        self.env = env
        self.defaults = defaults or {}

    def get(self, *names: str) -> Tuple[Optional[str], Optional[str]]:
        for name in names:
            value = self.env.get(name)
            if value is not None and value.strip() != "":
                return value.strip(), name
        return None, None

    def flag(self, name: str) -> bool:
        value, _ = self.get(name)
        return value is not None and value.lower() in TRUE_WORDS

    def number(self, names, default, kind=int, minimum=None, allowed=None):
        names = (names,) if isinstance(names, str) else names
        raw, name = self.get(*names)
        if raw is None:
            if names[0] in self.defaults:
                return self.defaults[names[0]], "default (demo)"
            return default, "default"
        try:
            value = _whole(raw) if kind is int else float(raw)
            if kind is float and not math.isfinite(value):
                raise ValueError
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise LaunchError(f"{name}={raw!r} is not {what}") from None
        if minimum is not None and value < minimum:
            raise LaunchError(f"{name}={raw} must be >= {minimum}")
        if allowed is not None and value not in allowed:
            raise LaunchError(f"{name}={raw} must be one of {', '.join(map(str, allowed))}")
        return value, name


def _whole(raw: str) -> int:
    """An integer, also written as 2e9 or 1_000 (budgets are typed that way), but not 2.5."""
    try:
        return int(raw)
    except ValueError:
        value = float(raw)
        if not value.is_integer():
            raise
        return int(value)


def _hosts(hostfile: Optional[str]) -> List[str]:
    if not hostfile or not os.path.isfile(hostfile):
        return []
    hosts = []
    with open(hostfile) as f:
        for line in f:
            host = line.split()[0] if line.strip() and not line.startswith("#") else None
            if host and host not in hosts:
                hosts.append(host)
    return hosts


def detect_accelerators() -> Tuple[str, int]:
    """(accelerator name, devices on this host) through DeepSpeed's accelerator abstraction."""

    name = accelerator_name()
    return name, (1 if name == "cpu" else max(1, _accel().device_count()))


def _exact(raw: str) -> str:
    """A number as the user typed it (validated elsewhere); the trainer parses the same text."""
    return raw.strip()


class _Flags:
    """The trainer flags the variables become, and which variable each came from (so that the
    plan's messages, which name flags, can be said in the variables the user typed)."""

    def __init__(self):
        self.argv: List[str] = []
        self.origin: List[Tuple[str, str, str]] = []  # (flag, value text, variable)

    def add(self, flag: str, value: Optional[str] = None, variable: Optional[str] = None) -> None:
        self.argv += [flag] if value is None else [flag, value]
        if variable is not None:
            self.origin.append((flag, "" if value is None else value, variable))

    def say_in_variables(self, message: str) -> str:
        """``--lr 0.5`` -> ``LR=0.5`` for flags the variables produced; a bare flag before ``=`` or
        ``:`` (``--train-iters = 100 // 8``) becomes its variable's name."""
        for flag, value, variable in sorted(self.origin, key=lambda o: -len(o[0])):
            if value:
                message = re.sub(rf"{re.escape(flag)} {re.escape(value)}(?![\w.])", f"{variable}={value}", message)
        for flag, variable in FLAG_VARIABLES.items():
            message = re.sub(rf"{re.escape(flag)}(?= =|:)", variable, message)
        return message


# The flag each variable sets (for messages about flags the user never typed).
FLAG_VARIABLES = {
    "--train-iters": "TRAIN_ITERS", "--train-tokens": "TRAIN_TOKENS", "--micro-batch-size": "MICRO_BATCH",
    "--global-batch-size": "GLOBAL_BATCH", "--gradient-accumulation-steps": "GRAD_ACC_STEPS",
    "--tensor-model-parallel-size": "TP", "--pipeline-model-parallel-size": "PP", "--zero-stage": "ZERO_STAGE",
    "--expert-model-parallel-size": "EP", "--ds-sequence-parallel-size": "SP", "--num-experts": "NUM_EXPERTS",
    "--num-attention-heads": "HEADS", "--num-key-value-heads": "NUM_KV_HEAD", "--hidden-size": "HIDDEN",
    "--num-layers": "NLAYERS", "--seq-length": "SEQ",
}


def resolve(environ: Dict[str, str], extra_args: List[str], repo: str,
            accelerator: Optional[Tuple[str, int]] = None, check_files: Optional[bool] = None) -> Launch:
    """Variables -> trainer flags -> the run plan (``megatron_ext.plan``), which does every derivation
    and check; the settings table shows the plan's values. ``check_files`` (default: unless the demo
    corpus is still to be built) makes the plan resolve the tokenizer and data files too."""
    demo = not (environ.get("DATA_FILE_LIST") or "").strip()
    e = _Env(environ, DEMO_DEFAULTS if demo else None)
    notes: List[str] = []
    settings: List[Tuple[str, str, str]] = []
    resolved: Dict[str, str] = {}
    f = _Flags()

    def note(key: str, value, source: str) -> None:
        settings.append((key, str(value), source))
        resolved[key] = str(value)

    def number(var_names, flag, default, kind=int, minimum=None, allowed=None, source_default="default"):
        value, src = e.number(var_names, default, kind=kind, minimum=minimum, allowed=allowed)
        if value is None:
            return None, src
        names = (var_names,) if isinstance(var_names, str) else var_names
        raw = e.get(*names)[0] if src in names else None
        text = _exact(raw) if (raw is not None and kind is float) else str(value)
        f.add(flag, text, names[0])
        note(names[0], text, src if src != "default" else source_default)
        return value, src

    accel_name, local_devices = accelerator or detect_accelerators()
    on_cpu = accel_name == "cpu"

    # --- machine and world -------------------------------------------------------------
    hostfile, hostfile_var = e.get("HOSTFILE", "PBS_NODEFILE")
    if hostfile and not os.path.isfile(hostfile):
        raise LaunchError(f"{hostfile_var}={hostfile}: no such file")
    hosts = _hosts(hostfile) or ["localhost"]
    ngpu, src = e.number("NGPU_PER_HOST", local_devices, minimum=1)
    note("NGPU_PER_HOST", ngpu, src if src != "default" else f"detected ({accel_name})")
    note("NHOSTS", len(hosts), hostfile_var or "default")
    world = len(hosts) * ngpu
    note("WORLD_SIZE", world, "NHOSTS x NGPU_PER_HOST")

    # --- model ---------------------------------------------------------------------------
    arch_raw, arch_src = e.get("MODEL_ARCH")
    arch = preset_name(arch_raw) if arch_raw else ("tiny" if on_cpu else "7B")
    if arch is None:
        hint = close_hint(arch_raw, MODEL_PRESETS, cutoff=0.5)
        raise LaunchError(f"MODEL_ARCH={arch_raw!r} is not a known preset{hint}; known: {', '.join(MODEL_PRESETS)}")
    note("MODEL_ARCH", arch, arch_src or ("default (no accelerator: CPU demo size)" if on_cpu else "default"))
    preset = MODEL_PRESETS[arch]
    layers, _ = number(("NLAYERS", "NUM_LAYERS"), "--num-layers", preset["num_layers"], minimum=1, source_default="preset")
    hidden, _ = number("HIDDEN", "--hidden-size", preset["hidden_size"], minimum=1, source_default="preset")
    number("FFN_HIDDEN_SIZE", "--ffn-hidden-size", preset["ffn_hidden_size"], minimum=1, source_default="preset")
    number(("HEADS", "NHEADS"), "--num-attention-heads", preset["num_attention_heads"], minimum=1,
           source_default="preset")
    number("NUM_KV_HEAD", "--num-key-value-heads", preset["num_key_value_heads"], minimum=1, source_default="preset")
    seq, _ = number(("SEQ", "SEQ_LEN"), "--seq-length", preset["seq_length"], minimum=1, source_default="preset")
    f.add("--max-position-embeddings", str(seq), "SEQ")
    number("ROPE_THETA", "--rope-theta", preset["rope_theta"], kind=float, minimum=1, source_default="preset")
    if preset.get("flags"):  # architecture flags (MLA, MoE...): before the variables' flags, which win
        f.argv += list(preset["flags"])
        note("MODEL_ARCH flags", " ".join(preset["flags"]), f"preset {arch}")
    llama = not e.flag("NO_LLAMA")
    note("NO_LLAMA", "" if llama else "1", "NO_LLAMA" if not llama else "unset: llama-style")
    f.add("--model-style", "llama" if llama else "gpt2", "NO_LLAMA")

    # --- parallelism and precision -----------------------------------------------------------
    number("TP", "--tensor-model-parallel-size", 1, minimum=1)
    number("PP", "--pipeline-model-parallel-size", 1, minimum=1)
    # EP: no variable in ALCF's helpers.sh; the fork's MoE examples call it EP_PARALLEL_SIZE (their
    # EP_SIZE is the expert count, so it is not read here)
    number(("EP", "EP_PARALLEL_SIZE"), "--expert-model-parallel-size", 1, minimum=1)
    # SP is helpers.sh's --ds-sequence-parallel-size; the run plan refuses it above 1 (one home)
    number("SP", "--ds-sequence-parallel-size", 1, minimum=1)
    number("ZERO_STAGE", "--zero-stage", 1, allowed=(0, 1, 2, 3))
    dtype, dtype_src = e.get("DTYPE")
    dtype = (dtype or ("fp32" if on_cpu else "bf16")).lower()
    if dtype not in ("bf16", "fp16", "fp32"):
        raise LaunchError(f"DTYPE={dtype!r} must be one of bf16, fp16, fp32")
    note("DTYPE", dtype, dtype_src or ("default (CPU)" if on_cpu else "default"))
    if dtype != "fp32":
        f.add(f"--{dtype}", None, "DTYPE")

    # --- batch and length (the plan derives the rest) -------------------------------------------
    number("MICRO_BATCH", "--micro-batch-size", LAUNCHER_DEFAULTS["MICRO_BATCH"], minimum=1)
    number("GRAD_ACC_STEPS", "--gradient-accumulation-steps", None, minimum=1)  # (unset: no flag)
    number("GLOBAL_BATCH", "--global-batch-size", None, minimum=1)
    iters_given = e.get("TRAIN_ITERS", "TRAIN_ITER")[0] is not None
    tokens_given = e.get("TRAIN_TOKENS")[0] is not None
    if iters_given:
        number(("TRAIN_ITERS", "TRAIN_ITER"), "--train-iters", None, minimum=1)
    if tokens_given or (not iters_given and not demo):
        number("TRAIN_TOKENS", "--train-tokens", DEFAULT_TRAIN_TOKENS, minimum=1)
    if demo and not iters_given and not tokens_given:
        f.add("--train-iters", str(DEMO_TRAIN_ITERS), "TRAIN_ITERS")
        note("TRAIN_ITERS", DEMO_TRAIN_ITERS, "default (demo)")

    # --- optimizer and learning rate ---------------------------------------------------------

    opt_raw, opt_src = e.get("OPT", "OPTIMIZER", "OPTIM")
    try:
        opt = OPTIMIZERS.get(opt_raw or "adamw").name
    except UnknownPluginError as err:
        raise LaunchError(f"{opt_src}={opt_raw!r}: {err}") from None
    f.add("--optimizer", opt, opt_src or "OPT")
    note("OPT", opt, opt_src or "default")
    number("LR", "--lr", LAUNCHER_DEFAULTS["LR"], kind=float, minimum=0)
    style_raw, style_src = e.get("LR_DECAY_STYLE")
    try:
        style = SCHEDULES.get(style_raw or "cosine").name
    except UnknownPluginError as err:
        raise LaunchError(f"LR_DECAY_STYLE={style_raw!r}: {err}") from None
    f.add("--lr-decay-style", style, "LR_DECAY_STYLE")
    note("LR_DECAY_STYLE", style, style_src or "default")
    warm, s = number(("LR_WARMUP_FRAC", "LR_WARMUP_FRACTION"), "--lr-warmup-fraction",
                     LAUNCHER_DEFAULTS["LR_WARMUP_FRAC"], kind=float, minimum=0)
    if warm > 1:
        raise LaunchError(f"{s}={warm} must be a fraction in [0, 1]")
    number("LR_DECAY_ITERS", "--lr-decay-iters", None, minimum=1)
    for var, flag, minimum in (("ADAM_BETA1", "--adam-beta1", None), ("ADAM_BETA2", "--adam-beta2", None),
                               ("ADAM_EPS", "--adam-eps", None), ("WEIGHT_DECAY", "--weight-decay", 0),
                               ("CLIP_GRAD", "--clip-grad", 0)):
        number(var, flag, LAUNCHER_DEFAULTS[var], kind=float, minimum=minimum)

    # --- data --------------------------------------------------------------------------------
    data_file_list, dfl_src = e.get("DATA_FILE_LIST")
    if data_file_list is not None and not os.path.isfile(data_file_list):
        raise LaunchError(f"DATA_FILE_LIST={data_file_list}: no such file")
    demo_dir = os.path.abspath(e.get("DEMO_DIR")[0] or os.path.join(repo, "data", "demo"))
    tok_model = None
    demo_corpus = None  # what the demo corpus is built with (megatron_ext.launcher.demo.prepare)
    # The user's tokenizer is never replaced by the demo's: with TOKENIZER_TYPE or TOKENIZER_MODEL
    # set, the demo corpus is tokenized with it (demo.py).
    own_tokenizer = e.get("TOKENIZER_TYPE")[0] is not None or e.get("TOKENIZER_MODEL")[0] is not None
    if demo and not own_tokenizer:
        data_file_list = demo_data_file_list(demo_dir)
        tok_type, tok_model = "SentencePieceTokenizer", os.path.join(demo_dir, "tokenizer.model")
        demo_corpus = dict(demo_dir=demo_dir)
        note("DATA_FILE_LIST", data_file_list, "default: demo corpus (Shakespeare), built on first use")
        note("TOKENIZER_TYPE", tok_type, "demo")
        note("TOKENIZER_MODEL", tok_model, "demo")
    else:
        if not demo:
            data_file_list = os.path.abspath(data_file_list)
            note("DATA_FILE_LIST", data_file_list, dfl_src)
        tok_type, s = e.get("TOKENIZER_TYPE")
        tok_type = tok_type or "HFTokenizer"
        note("TOKENIZER_TYPE", tok_type, s or "default")
        tok_model, s = e.get("TOKENIZER_MODEL")
        if tok_model is None and tok_type.lower() in ("hftokenizer", "huggingfacetokenizer"):
            tok_model, s = DEFAULT_HF_TOKENIZER, "default (Megatron-DeepSpeed's; a hub name, from the local cache)"
        if tok_model is not None:
            if os.path.exists(tok_model):
                tok_model = os.path.abspath(tok_model)
            note("TOKENIZER_MODEL", tok_model, s)
        if demo:
            try:  # the tokenizer is built here: a missing or unusable one stops before anything is built
                data_file_list = demo_data_file_list(demo_dir, tok_type, tok_model)
            except (ValueError, OSError) as err:
                detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise LaunchError(f"TOKENIZER_TYPE={tok_type} TOKENIZER_MODEL={tok_model}: {detail} (the demo "
                                  "corpus is tokenized with your tokenizer; or give DATA_FILE_LIST)") from None
            demo_corpus = dict(demo_dir=demo_dir, tokenizer_type=tok_type, tokenizer_model=tok_model)
            note("DATA_FILE_LIST", data_file_list, "default: demo corpus (Shakespeare) tokenized with your "
                 "TOKENIZER_TYPE/TOKENIZER_MODEL, built on first use, kept per tokenizer")
    f.add("--data-file-list", data_file_list, "DATA_FILE_LIST")
    f.add("--tokenizer-type", tok_type, "TOKENIZER_TYPE")
    if tok_model:
        f.add("--tokenizer-model", tok_model, "TOKENIZER_MODEL")
    cache, s = e.get("DATA_CACHE_PATH")
    cache = os.path.abspath(cache or os.path.join(repo, ".cache", "index-cache"))
    note("DATA_CACHE_PATH", cache, s or "default")
    f.add("--data-cache-path", cache, "DATA_CACHE_PATH")
    split = []
    for var in ("TRAIN_SPLIT", "VAL_SPLIT", "TEST_SPLIT"):
        e.number(var, 0.0, kind=float, minimum=0)  # validates the text
        split.append(_exact(e.get(var)[0] or LAUNCHER_DEFAULTS[var]))
    note("TRAIN/VAL/TEST_SPLIT", "/".join(split), "TRAIN_SPLIT/VAL_SPLIT/TEST_SPLIT")
    f.add("--split", ",".join(split))

    # --- evaluation, logging, checkpoints ------------------------------------------------------
    for var, flag, minimum in (("EVAL_INTERVAL", "--eval-interval", 1), ("EVAL_ITERS", "--eval-iters", 0),
                               ("LOG_INTERVAL", "--log-interval", 1), ("SAVE_INTERVAL", "--save-interval", 1),
                               ("SEED", "--seed", 0)):
        number(var, flag, LAUNCHER_DEFAULTS[var], minimum=minimum)
    # A walltime SIGTERM/SIGUSR1 saves and exits 0 instead of losing the work since the last save;
    # --no-exit-signal-handler after the script turns it off.
    f.add("--exit-signal-handler")
    if demo:
        f.add("--eval-at-start")  # the demo reports how far validation loss fell
    if e.flag("USE_ACTIVATION_CHECKPOINTING"):
        n, s = e.number("ACT_CKPT_NUM_LAYERS", 1, minimum=1)
        f.add("--recompute-activations", None, "USE_ACTIVATION_CHECKPOINTING")
        f.add("--recompute-num-layers", str(n), "ACT_CKPT_NUM_LAYERS")
        note("USE_ACTIVATION_CHECKPOINTING", f"1 ({n} layer(s) per checkpoint)", "USE_ACTIVATION_CHECKPOINTING")
    init_std, s = e.get("INIT_METHOD_STD")
    if init_std is not None:  # 'auto' = sqrt(2/(5*HIDDEN)), what Megatron-DeepSpeed's launcher passes
        f.add("--init-method-std", init_std, "INIT_METHOD_STD")
        note("INIT_METHOD_STD", init_std, s)
    base_width, s = e.number("MUP_BASE_WIDTH", None, minimum=1)
    depth_base, s2 = e.number("DEPTH_BASE", None, minimum=1)
    if depth_base is not None:  # depth transfer is CompleteP (which includes muP's width rules)
        f.add("--parametrization", "completep", "DEPTH_BASE")
        f.add("--depth-base", str(depth_base), "DEPTH_BASE")
        note("DEPTH_BASE", f"{depth_base} (--parametrization completep)", s2)
    elif base_width is not None:
        f.add("--parametrization", "mup", "MUP_BASE_WIDTH")
    if base_width is not None:
        f.add("--mup-base-hidden", str(base_width), "MUP_BASE_WIDTH")
        note("MUP_BASE_WIDTH", f"{base_width} (--parametrization {'completep' if depth_base else 'mup'})", s)
    _moe_mtp_flags(e, note, f)
    if e.flag("CPU_OPTIMIZER"):
        f.add("--cpu-optimizer", None, "CPU_OPTIMIZER")
        note("CPU_OPTIMIZER", "1", "CPU_OPTIMIZER")
    if e.get("OVERRIDE_CKPT_OPT_PARAM")[0]:
        f.add("--override-opt-param-scheduler", None, "OVERRIDE_CKPT_OPT_PARAM")
        note("OVERRIDE_CKPT_OPT_PARAM", "1: take the schedule from the command line", "OVERRIDE_CKPT_OPT_PARAM")
    else:
        f.add("--use-checkpoint-opt-param-scheduler")
    if e.get("NO_TENSORBOARD")[0]:
        f.add("--no-tensorboard", None, "NO_TENSORBOARD")
    wandb_project, s = e.get("WB_PROJECT", "WANDB_PROJECT")
    if wandb_project and (e.get("WANDB_MODE")[0] or "online").lower() != "disabled":
        f.add("--wandb-project", wandb_project, s)
        note("WANDB_PROJECT", wandb_project, s)
    ds_config_user, s = e.get("DS_CONFIG")
    if ds_config_user is not None:
        if not os.path.isfile(ds_config_user):
            raise LaunchError(f"DS_CONFIG={ds_config_user}: no such file")
        f.add("--deepspeed-config", os.path.abspath(ds_config_user), "DS_CONFIG")

    # --- the run plan: the trainer's own parser and plan (extra arguments last: they win) -------
    if check_files is None:
        check_files = not demo or os.path.isfile(data_file_list)

    parser = build_parser(prog="train_alcf.sh")
    args = _parse_extra(parser, f.argv + list(extra_args))
    save, save_src = e.get("SAVE")
    load, load_src = e.get("LOAD")
    given_save = args.save or (os.path.abspath(save) if save else None)
    given_load = args.load or (os.path.abspath(load) if load else None)
    args.save = given_save or os.path.join(repo, "checkpoints", "run")
    args.load = given_load or args.save
    # without SAVE the first plan only names the run directory: its files are checked once, below
    plan = _plan(args, world, check_files and given_save is not None, f)
    if given_save is None:  # the descriptive default name, from what the plan resolved
        args.save = os.path.join(repo, "checkpoints", run_name(arch, plan, preset))
        args.load = given_load or args.save
        plan = _plan(args, world, check_files, f)

    refusal = launch_problem(plan)  # the memory plan: what cannot fit is not launched (--allow-oversubscribe)
    run_dir = os.path.abspath(args.save)
    args.load = os.path.abspath(args.load)
    note("SAVE", run_dir, "--save" if "--save" in _normalised(extra_args) else save_src or "default (descriptive name)")
    note("LOAD", args.load, "--load" if "--load" in _normalised(extra_args) else load_src or "= SAVE")
    _show_plan(settings, notes, plan, f)
    ds_config = None
    ds_config_path = os.path.join(run_dir, "ds_config.json")
    if plan.args.deepspeed_config is None:
        ds_config = plan.ds_config
        f.add("--deepspeed-config", ds_config_path)
    else:
        ds_config_path = plan.args.deepspeed_config
    note("DS_CONFIG", ds_config_path, "DS_CONFIG" if ds_config_user else
         "--deepspeed-config" if ds_config is None else "generated from the variables")
    f.add("--save", run_dir)
    f.add("--load", args.load)
    trainer_argv = f.argv + list(extra_args)

    command = launch_command(e, trainer_argv, hosts, hostfile, ngpu, world, run_dir)
    launcher = os.path.basename(command[0]) if command[0] != sys.executable else (
        "torchrun" if "torch.distributed.run" in command else "python (single process)")
    note("LAUNCH_WITH", launcher, e.get("LAUNCH_WITH", "LAUNCH_CMD")[1] or "auto")
    return Launch(settings, resolved, trainer_argv, command, run_dir, ds_config, ds_config_path, notes, plan,
                  check_files, f.say_in_variables(refusal) if refusal else None, demo_corpus)


def _normalised(argv: List[str]) -> List[str]:

    return [a.split("=", 1)[0] for a in normalise_argv(list(argv))]


def _plan(args, world: int, check_files: bool, f: "_Flags"):

    try:
        return build_plan(args, world, check_files=check_files)
    except ArgumentsError as err:
        raise LaunchError(f.say_in_variables(str(err))) from None


def run_name(arch: str, plan, preset: dict) -> str:
    """The descriptive run directory of Megatron-DeepSpeed's launcher, from the resolved plan."""
    a = plan.args
    custom = (a.num_layers, a.hidden_size) != (preset["num_layers"], preset["hidden_size"])
    return (f"{arch}{'-custom' if custom else ''}-ws{plan.world_size}-ds-stage{plan.engine.zero_stage}"
            f"-nl{a.num_layers}-hs{a.hidden_size}-mb{a.micro_batch_size}-gb{a.global_batch_size}"
            f"-seq{a.seq_length}-opt{a.optimizer}-lr{a.lr:g}-tp{a.tensor_model_parallel_size}"
            # PP / EP only when split, so that the names of earlier runs (and their resumes) stay
            + (f"-pp{a.pipeline_model_parallel_size}" if a.pipeline_model_parallel_size > 1 else "")
            + (f"-ep{a.expert_model_parallel_size}" if a.expert_model_parallel_size > 1 else "")
            + f"-{plan.engine.precision}"
            # another expert count or MTP depth is another model: never resume the wrong one
            + (f"-moe{a.num_experts}x{a.moe_router_topk}" if a.num_experts else "")
            + (f"-mtp{a.mtp_num_layers}" if a.mtp_num_layers else ""))


def _show_plan(settings, notes, plan, f: "_Flags") -> None:
    """The table shows what the plan resolved (extra arguments included), and the plan's notes."""
    a = plan.args
    derived = {
        "data-parallel size": (a.data_parallel_size, "plan: WORLD_SIZE / (TP x PP)"),
        "GRAD_ACC_STEPS": (a.gradient_accumulation_steps, "plan: GLOBAL_BATCH / (data-parallel x MICRO_BATCH)"),
        "GLOBAL_BATCH": (a.global_batch_size, "plan: data-parallel x MICRO_BATCH x GRAD_ACC_STEPS"),
        "TRAIN_ITERS": (a.train_iters, "plan: TRAIN_TOKENS // (SEQ x GLOBAL_BATCH)"),
        "TRAIN_TOKENS (trained)": (a.train_iters * plan.tokens_per_iteration, "plan: TRAIN_ITERS x SEQ x GLOBAL_BATCH"),
        "ZERO_STAGE": (plan.engine.zero_stage, "plan"),
        "DTYPE": (plan.engine.precision, "plan"),
    }
    at = next(i for i, (k, _, _) in enumerate(settings) if k == "WORLD_SIZE") + 1
    for key, (value, rule) in derived.items():
        i = next((i for i, (k, _, _) in enumerate(settings) if k == key), None)
        if i is None:
            settings.insert(at, (key, str(value), rule))
            at += 1
        elif settings[i][1] != str(value):
            settings[i] = (key, str(value), f"{settings[i][2]}, after extra arguments")
    notes.extend(f.say_in_variables(n) for n in plan.notes)


# MoE / MTP variables -> trainer flags (megatron_ext/models/features/moe_mtp.py; docs/moe_mtp.md). Unset: not passed.
MOE_MTP_NUMBERS = (  # (variable, aliases...), flag, kind, minimum
    (("NUM_EXPERTS",), "--num-experts", int, 1),
    (("MOE_TOPK", "MOE_ROUTER_TOPK"), "--moe-router-topk", int, 1),
    (("MOE_FFN_HIDDEN_SIZE",), "--moe-ffn-hidden-size", int, 1),
    (("MOE_AUX_LOSS_COEFF",), "--moe-aux-loss-coeff", float, 0),
    (("MOE_Z_LOSS_COEFF",), "--moe-z-loss-coeff", float, 0),
    (("MOE_TOPK_SCALING_FACTOR", "MOE_ROUTED_SCALING_FACTOR"), "--moe-router-topk-scaling-factor", float, 0),
    (("MOE_FIRST_K_DENSE", "FIRST_K_DENSE_REPLACE"), "--moe-first-k-dense", int, 1),
    (("MTP_NUM_LAYERS", "NUM_MTP_PREDICTOR"), "--mtp-num-layers", int, 1),
    (("MTP_LOSS_SCALING_FACTOR", "MTP_LOSS_COEFF"), "--mtp-loss-scaling-factor", float, 0),
)
MOE_MTP_WORDS = (  # variable, flag (checked with the trainer's own value type)
    ("MOE_ROUTER_DTYPE", "--moe-router-dtype"),
    ("MOE_SCORE_FUNCTION", "--moe-router-score-function"),
    ("MOE_LOAD_BALANCING_TYPE", "--moe-router-load-balancing-type"),
    ("MOE_LAYER_FREQ", "--moe-layer-freq"),
)


def _moe_mtp_flags(e: _Env, note, f: "_Flags") -> None:
    import argparse

    for names, flag, kind, minimum in MOE_MTP_NUMBERS:
        value, src = e.number(names, None, kind=kind, minimum=minimum)
        if value is not None:
            f.add(flag, str(value), names[0])  # str: a float's shortest exact spelling
            note(names[0], value, src)
    for name, flag in MOE_MTP_WORDS:
        raw, _ = e.get(name)
        if raw is None:
            continue
        try:
            VALUE_TYPES[flag](raw)
        except argparse.ArgumentTypeError as err:
            raise LaunchError(f"{name}={raw!r}: {err}") from None
        f.add(flag, raw, name)
        note(name, raw, name)
    if e.flag("MOE_ROUTER_PRE_SOFTMAX"):
        f.add("--moe-router-pre-softmax", None, "MOE_ROUTER_PRE_SOFTMAX")
        note("MOE_ROUTER_PRE_SOFTMAX", "1", "MOE_ROUTER_PRE_SOFTMAX")


def _parse_extra(parser, argv):
    """Parse with the trainer's parser; a bad extra argument becomes one LaunchError line."""

    args, problem = parse_or_problem(parser, argv)
    if problem is not None:
        raise LaunchError(problem)
    return args


def launch_command(e: _Env, trainer_argv, hosts, hostfile, ngpu, world, run_dir) -> List[str]:
    """mpiexec on PBS/hostfile machines (ezpz-launch when installed), torchrun for several local
    processes, the DeepSpeed launcher when asked, otherwise one plain process."""
    how, var = e.get("LAUNCH_WITH", "LAUNCH_CMD")
    how = (how or "").lower()
    exec_target, _ = e.get("EXEC")
    entry = [sys.executable, exec_target] if exec_target and exec_target.endswith(".py") else \
        [sys.executable, "-m", exec_target or "megatron_ext.train"]
    if not how:
        if hostfile and shutil.which("ezpz-launch"):
            how = "ezpz"
        elif hostfile and shutil.which("mpiexec"):
            how = "mpiexec"
        elif world > 1:
            how = "torchrun"
        else:
            how = "python"
    if how in ("mpiexec", "mpirun", "mpi"):
        cmd = ["mpiexec", "--envall", "-n", str(world), "-ppn", str(ngpu)]
        if hostfile:
            cmd += ["--hostfile", hostfile]
        cpu_bind, _ = e.get("CPU_BIND")
        if cpu_bind:
            cmd += ["--cpu-bind", cpu_bind]
        return cmd + entry + trainer_argv
    if how == "ezpz":
        return ["ezpz-launch"] + entry + trainer_argv
    if how == "torchrun":
        if len(hosts) > 1:
            raise LaunchError("LAUNCH_WITH=torchrun starts one host; use mpiexec, ezpz or deepspeed for several hosts")
        port, _ = e.get("MASTER_PORT")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ngpu)]
        cmd += ["--master_port", port] if port else ["--standalone"]
        return cmd + entry[1:] + trainer_argv
    if how == "deepspeed":
        cmd = ["deepspeed"]
        if len(hosts) > 1:
            cmd += ["--hostfile", os.path.join(run_dir, "hostfile_deepspeed")]
        cmd += ["--num_gpus", str(ngpu)]
        if entry[1] == "-m":
            cmd += ["--module", entry[2]]
        else:
            cmd += [entry[1]]
        return cmd + trainer_argv
    if how == "python":
        if world > 1:
            raise LaunchError(f"LAUNCH_WITH=python runs one process but the world size is {world}")
        return entry + trainer_argv
    raise LaunchError(f"{var}={how!r} must be one of mpiexec, ezpz, torchrun, deepspeed, python")


def settings_table(launch: Launch) -> str:
    width = max(len(k) for k, _, _ in launch.settings)
    vwidth = min(60, max(len(v) for _, v, _ in launch.settings))
    lines = ["=" * 100, "train_alcf.sh resolved settings", "-" * 100]
    lines += [f"  {k:<{width}}  {v:<{vwidth}}  [{src}]" for k, v, src in launch.settings]
    lines += [f"  note: {n}" for n in launch.notes]
    if not launch.files_checked:
        lines.append("  note: the demo corpus is built at launch; its tokenizer and data files are checked then")
    if launch.refusal:
        lines.append(f"  note: the launch would be refused: {launch.refusal}")

    rows = launch.plan.rows()
    layout = layout_rows(launch.plan, int(launch.env["NGPU_PER_HOST"]), int(launch.env["NHOSTS"]))
    pwidth = max(len(k) for k, _ in rows + layout)
    lines += ["-" * 100, "run plan (what the trainer will do):"]
    lines += [f"  {k:<{pwidth}} : {v}" for k, v in rows]
    lines += ["-" * 100, "parallel layout (ranks as megatron-core groups them; what each rank holds):"]
    lines += [f"  {k:<{pwidth}} : {v}" for k, v in layout]
    lines += ["-" * 100, "command:", "  " + shlex.join(launch.command), "=" * 100]
    return "\n".join(lines)
