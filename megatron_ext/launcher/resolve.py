"""Environment variables of ``train_alcf.sh`` -> trainer flags, DeepSpeed config, launch command.

Every variable of Megatron-DeepSpeed's ``train_alcf.sh`` is read with its documented default, both
spellings where its docs and script disagree. Extra command-line arguments are appended AFTER the
generated flags, so they always win (argparse keeps the last value). The final argument list is
parsed and validated by the trainer's own parser, so what is printed is what will run.
Any bad value is one line naming the variable (``LaunchError``), before anything starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import shlex
import shutil
import sys
from typing import Dict, List, Optional, Tuple

from megatron_ext.launcher.presets import MODEL_PRESETS, preset_name

TRUE = ("1", "true", "yes", "on")
DEFAULT_TRAIN_TOKENS = 2_000_000_000_000  # Megatron-DeepSpeed's train_alcf.sh default
# With no DATA_FILE_LIST the launcher runs the demo; these replace the documented defaults there
# (and only there) so a tiny model learns visibly in a few CPU minutes.
DEMO_DEFAULTS = {"MICRO_BATCH": 8, "LR": 1e-3, "EVAL_INTERVAL": 250, "EVAL_ITERS": 10, "SAVE_INTERVAL": 250,
                 "LOG_INTERVAL": 25}
DEMO_TRAIN_ITERS = 1000  # when neither TRAIN_ITERS nor TRAIN_TOKENS is given


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
    demo: bool
    notes: List[str]


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
        return value is not None and value.lower() in TRUE

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
    from megatron_ext.platform.accelerator import _accel, accelerator_name

    name = accelerator_name()
    return name, (1 if name == "cpu" else max(1, _accel().device_count()))


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def resolve(environ: Dict[str, str], extra_args: List[str], repo: str,
            accelerator: Optional[Tuple[str, int]] = None) -> Launch:
    demo = not (environ.get("DATA_FILE_LIST") or "").strip()
    e = _Env(environ, DEMO_DEFAULTS if demo else None)
    notes: List[str] = []
    settings: List[Tuple[str, str, str]] = []
    resolved: Dict[str, str] = {}

    def note(key: str, value, source: str) -> None:
        settings.append((key, str(value), source))
        resolved[key] = str(value)

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
        close = difflib.get_close_matches(arch_raw, list(MODEL_PRESETS), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise LaunchError(f"MODEL_ARCH={arch_raw!r} is not a known preset{hint}; known: {', '.join(MODEL_PRESETS)}")
    note("MODEL_ARCH", arch, arch_src or ("default (no accelerator: CPU demo size)" if on_cpu else "default"))
    preset = MODEL_PRESETS[arch]
    layers, s = e.number(("NLAYERS", "NUM_LAYERS"), preset["num_layers"], minimum=1)
    note("NLAYERS", layers, s if s != "default" else "preset")
    hidden, s = e.number("HIDDEN", preset["hidden_size"], minimum=1)
    note("HIDDEN", hidden, s if s != "default" else "preset")
    heads, s = e.number(("HEADS", "NHEADS"), preset["num_attention_heads"], minimum=1)
    note("HEADS", heads, s if s != "default" else "preset")
    kv_heads, s = e.number("NUM_KV_HEAD", preset["num_key_value_heads"], minimum=1)
    note("NUM_KV_HEAD", kv_heads, s if s != "default" else "preset")
    ffn, s = e.number("FFN_HIDDEN_SIZE", preset["ffn_hidden_size"], minimum=1)
    note("FFN_HIDDEN_SIZE", ffn, s if s != "default" else "preset")
    seq, s = e.number(("SEQ", "SEQ_LEN"), preset["seq_length"], minimum=1)
    note("SEQ", seq, s if s != "default" else "preset")
    rope, s = e.number("ROPE_THETA", preset["rope_theta"], kind=float, minimum=1)
    note("ROPE_THETA", f"{rope:g}", s if s != "default" else "preset")
    llama = not e.flag("NO_LLAMA")
    note("NO_LLAMA", "" if llama else "1", "NO_LLAMA" if not llama else "unset: llama-style")

    # --- parallelism and precision -----------------------------------------------------------
    tp, s = e.number("TP", 1, minimum=1)
    note("TP", tp, s)
    pp, s = e.number("PP", 1, minimum=1)
    if pp != 1:
        raise LaunchError(f"PP={pp}: pipeline parallelism is not supported yet; use PP=1")
    sp, s = e.number("SP", 1, minimum=1)
    if sp != 1:
        raise LaunchError(f"SP={sp}: sequence parallelism (DeepSpeed-Ulysses) is not supported yet; use SP=1")
    if heads % tp:
        raise LaunchError(f"TP={tp} does not divide HEADS={heads}")
    if kv_heads % tp:
        raise LaunchError(f"TP={tp} does not divide NUM_KV_HEAD={kv_heads}")
    if world % (tp * pp * sp):
        raise LaunchError(f"TP={tp} x PP={pp} x SP={sp} does not divide the world size {world}")
    dp = world // (tp * pp * sp)
    note("data-parallel size", dp, "WORLD_SIZE / (TP x PP x SP)")
    zero, s = e.number("ZERO_STAGE", 1, allowed=(0, 1, 2, 3))
    note("ZERO_STAGE", zero, s)
    dtype, dtype_src = e.get("DTYPE")
    dtype = (dtype or ("fp32" if on_cpu else "bf16")).lower()
    if dtype not in ("bf16", "fp16", "fp32"):
        raise LaunchError(f"DTYPE={dtype!r} must be one of bf16, fp16, fp32")
    note("DTYPE", dtype, dtype_src or ("default (CPU)" if on_cpu else "default"))

    # --- batch and budget --------------------------------------------------------------------
    micro, s = e.number("MICRO_BATCH", 1, minimum=1)
    note("MICRO_BATCH", micro, s)
    gas_given, gas_src = e.number("GRAD_ACC_STEPS", None, minimum=1)
    gb_given, gb_src = e.number("GLOBAL_BATCH", None, minimum=1)
    if gb_given is not None:
        if gb_given % (dp * micro):
            raise LaunchError(
                f"GLOBAL_BATCH={gb_given} is not divisible by data-parallel size {dp} x MICRO_BATCH={micro}"
            )
        gas = gb_given // (dp * micro)
        if gas_given is not None and gas_given != gas:
            raise LaunchError(
                f"GRAD_ACC_STEPS={gas_given} disagrees with GLOBAL_BATCH={gb_given} / (data-parallel {dp} x "
                f"MICRO_BATCH={micro}) = {gas}"
            )
        global_batch = gb_given
        note("GRAD_ACC_STEPS", gas, "GLOBAL_BATCH / (data-parallel x MICRO_BATCH)")
    else:
        gas = gas_given or 1
        global_batch = dp * micro * gas
        note("GRAD_ACC_STEPS", gas, gas_src)
    note("GLOBAL_BATCH", global_batch, gb_src or "data-parallel x MICRO_BATCH x GRAD_ACC_STEPS")

    data_file_list, dfl_src = e.get("DATA_FILE_LIST")
    if data_file_list is not None and not os.path.isfile(data_file_list):
        raise LaunchError(f"DATA_FILE_LIST={data_file_list}: no such file")

    iters, iters_src = e.number(("TRAIN_ITERS", "TRAIN_ITER"), None, minimum=1)
    tokens, tokens_src = e.number("TRAIN_TOKENS", None, minimum=1)
    tokens_per_iter = seq * global_batch
    if iters is not None:
        if tokens is not None:
            notes.append(f"{iters_src}={iters} wins over TRAIN_TOKENS={tokens}")
        note("TRAIN_ITERS", iters, iters_src)
    else:
        if tokens is None:
            if demo:
                iters, iters_src = DEMO_TRAIN_ITERS, "default (demo)"
            else:
                tokens, tokens_src = DEFAULT_TRAIN_TOKENS, "default"
        if iters is None:
            iters = tokens // tokens_per_iter
            if iters < 1:
                raise LaunchError(
                    f"TRAIN_TOKENS={tokens} is less than one iteration of SEQ={seq} x GLOBAL_BATCH={global_batch} "
                    f"= {tokens_per_iter} tokens"
                )
            # the note on the rounding is written once the final batch is known (_final_batch_and_length)
            iters_src = "TRAIN_TOKENS // (SEQ x GLOBAL_BATCH)" + (" (default TRAIN_TOKENS)" if tokens_src == "default" else "")
        note("TRAIN_ITERS", iters, iters_src)
    note("TRAIN_TOKENS (trained)", iters * tokens_per_iter, "TRAIN_ITERS x SEQ x GLOBAL_BATCH")

    # --- optimizer and learning rate ---------------------------------------------------------
    from megatron_ext.optimizers import OPTIMIZERS
    from megatron_ext.registry import UnknownPluginError
    from megatron_ext.schedules import SCHEDULES

    opt_raw, opt_src = e.get("OPT", "OPTIMIZER", "OPTIM")
    try:
        opt = OPTIMIZERS.get(opt_raw or "adamw").name
    except UnknownPluginError as err:
        raise LaunchError(f"{opt_src}={opt_raw!r}: {err}") from None
    note("OPT", opt, opt_src or "default")
    lr, s = e.number("LR", 0.0002, kind=float, minimum=0)
    note("LR", _fmt_lr(lr), s)
    style_raw, style_src = e.get("LR_DECAY_STYLE")
    try:
        style = SCHEDULES.get(style_raw or "cosine").name
    except UnknownPluginError as err:
        raise LaunchError(f"LR_DECAY_STYLE={style_raw!r}: {err}") from None
    note("LR_DECAY_STYLE", style, style_src or "default")
    warm, s = e.number(("LR_WARMUP_FRAC", "LR_WARMUP_FRACTION"), 0.05, kind=float, minimum=0)
    if warm > 1:
        raise LaunchError(f"{s}={warm} must be a fraction in [0, 1]")
    note("LR_WARMUP_FRAC", f"{warm:g}", s)
    decay_iters, s = e.number("LR_DECAY_ITERS", None, minimum=1)
    if decay_iters is not None:
        note("LR_DECAY_ITERS", decay_iters, s)
    b1, s1 = e.number("ADAM_BETA1", 0.9, kind=float)
    b2, s2 = e.number("ADAM_BETA2", 0.95, kind=float)
    eps, s3 = e.number("ADAM_EPS", 1e-5, kind=float)
    wd, s4 = e.number("WEIGHT_DECAY", 0.1, kind=float, minimum=0)
    clip, s5 = e.number("CLIP_GRAD", 1.0, kind=float, minimum=0)
    for key, value, src in (("ADAM_BETA1", b1, s1), ("ADAM_BETA2", b2, s2), ("ADAM_EPS", eps, s3),
                            ("WEIGHT_DECAY", wd, s4), ("CLIP_GRAD", clip, s5)):
        note(key, f"{value:g}", src)

    # --- data --------------------------------------------------------------------------------
    demo_dir = os.path.abspath(e.get("DEMO_DIR")[0] or os.path.join(repo, "data", "demo"))
    if demo:
        data_file_list = os.path.join(demo_dir, "data_file_list.txt")
        tok_type, tok_model = "SentencePieceTokenizer", os.path.join(demo_dir, "tokenizer.model")
        note("DATA_FILE_LIST", data_file_list, "default: demo corpus (Shakespeare), built on first use")
        note("TOKENIZER_TYPE", tok_type, "demo")
        note("TOKENIZER_MODEL", tok_model, "demo")
    else:
        note("DATA_FILE_LIST", os.path.abspath(data_file_list), dfl_src)
        tok_type, s = e.get("TOKENIZER_TYPE")
        tok_type = tok_type or "HFTokenizer"
        note("TOKENIZER_TYPE", tok_type, s or "default")
        tok_model, s = e.get("TOKENIZER_MODEL")
        if tok_model is not None:
            if not os.path.exists(tok_model):
                raise LaunchError(f"TOKENIZER_MODEL={tok_model}: no such file or directory")
            note("TOKENIZER_MODEL", os.path.abspath(tok_model), s)
    cache, s = e.get("DATA_CACHE_PATH")
    cache = os.path.abspath(cache or os.path.join(repo, ".cache", "index-cache"))
    note("DATA_CACHE_PATH", cache, s or "default")
    split = []
    for var, default in (("TRAIN_SPLIT", 990), ("VAL_SPLIT", 10), ("TEST_SPLIT", 0)):
        value, s = e.number(var, default, kind=float, minimum=0)
        split.append(f"{value:g}")
    note("TRAIN/VAL/TEST_SPLIT", "/".join(split), "TRAIN_SPLIT/VAL_SPLIT/TEST_SPLIT")

    # --- evaluation, logging, checkpoints ------------------------------------------------------
    eval_interval, s = e.number("EVAL_INTERVAL", 100, minimum=1)
    note("EVAL_INTERVAL", eval_interval, s)
    eval_iters, s = e.number("EVAL_ITERS", 20, minimum=0)
    note("EVAL_ITERS", eval_iters, s)
    log_interval, s = e.number("LOG_INTERVAL", 1, minimum=1)
    note("LOG_INTERVAL", log_interval, s)
    save_interval, s = e.number("SAVE_INTERVAL", 50, minimum=1)
    note("SAVE_INTERVAL", save_interval, s)
    seed, s = e.number("SEED", 1234, minimum=0)
    note("SEED", seed, s)

    flags = [
        "--num-layers", str(layers), "--hidden-size", str(hidden), "--ffn-hidden-size", str(ffn),
        "--num-attention-heads", str(heads), "--num-key-value-heads", str(kv_heads),
        "--seq-length", str(seq), "--max-position-embeddings", str(seq), "--rope-theta", f"{rope:g}",
        "--model-style", "llama" if llama else "gpt2",
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--zero-stage", str(zero),
        "--micro-batch-size", str(micro),
        # What the user gave, not what follows from it: the trainer derives the rest, so an extra
        # --micro-batch-size also moves the global batch and the iterations of TRAIN_TOKENS.
        *(["--global-batch-size", str(global_batch)] if gb_given is not None else
          ["--gradient-accumulation-steps", str(gas)]),
        *(["--train-iters", str(iters)] if tokens is None or iters_src in ("TRAIN_ITERS", "TRAIN_ITER") else
          ["--train-tokens", str(tokens)]),
        "--optimizer", opt, "--lr", f"{lr:g}", "--lr-decay-style", style, "--lr-warmup-fraction", f"{warm:g}",
        "--adam-beta1", f"{b1:g}", "--adam-beta2", f"{b2:g}", "--adam-eps", f"{eps:g}",
        "--weight-decay", f"{wd:g}", "--clip-grad", f"{clip:g}",
        "--data-file-list", data_file_list, "--data-cache-path", cache, "--split", ",".join(split),
        "--tokenizer-type", tok_type,
        "--eval-interval", str(eval_interval), "--eval-iters", str(eval_iters),
        "--log-interval", str(log_interval), "--save-interval", str(save_interval), "--seed", str(seed),
        # A walltime SIGTERM/SIGUSR1 saves and exits 0 instead of losing the work since the last save;
        # --no-exit-signal-handler after the script turns it off.
        "--exit-signal-handler",
    ]
    if dtype != "fp32":
        flags.append(f"--{dtype}")
    if demo:
        flags.append("--eval-at-start")  # the demo reports how far validation loss fell
    if tok_model:
        flags += ["--tokenizer-model", tok_model]
    if decay_iters is not None:
        flags += ["--lr-decay-iters", str(decay_iters)]
    if e.flag("USE_ACTIVATION_CHECKPOINTING"):
        n, s = e.number("ACT_CKPT_NUM_LAYERS", 1, minimum=1)
        flags += ["--recompute-activations", "--recompute-num-layers", str(n)]
        note("USE_ACTIVATION_CHECKPOINTING", f"1 ({n} layer(s) per checkpoint)", "USE_ACTIVATION_CHECKPOINTING")
    init_std, s = e.get("INIT_METHOD_STD")
    if init_std is not None:  # 'auto' = sqrt(2/(5*HIDDEN)), what Megatron-DeepSpeed's launcher passes
        flags += ["--init-method-std", init_std]
        note("INIT_METHOD_STD", init_std, s)
    base_width, s = e.number("MUP_BASE_WIDTH", None, minimum=1)
    depth_base, s2 = e.number("DEPTH_BASE", None, minimum=1)
    if depth_base is not None:  # depth transfer is CompleteP (which includes muP's width rules)
        flags += ["--parametrization", "completep", "--depth-base", str(depth_base)]
        note("DEPTH_BASE", f"{depth_base} (--parametrization completep)", s2)
    elif base_width is not None:
        flags += ["--parametrization", "mup"]
    if base_width is not None:
        flags += ["--mup-base-hidden", str(base_width)]
        note("MUP_BASE_WIDTH", f"{base_width} (--parametrization {'completep' if depth_base else 'mup'})", s)
    flags += _moe_mtp_flags(e, note)
    if e.flag("CPU_OPTIMIZER"):
        flags.append("--cpu-optimizer")
        note("CPU_OPTIMIZER", "1", "CPU_OPTIMIZER")
    if e.get("OVERRIDE_CKPT_OPT_PARAM")[0]:
        flags.append("--override-opt-param-scheduler")
        note("OVERRIDE_CKPT_OPT_PARAM", "1: take the schedule from the command line", "OVERRIDE_CKPT_OPT_PARAM")
    else:
        flags.append("--use-checkpoint-opt-param-scheduler")
    if e.get("NO_TENSORBOARD")[0]:
        flags.append("--no-tensorboard")
    wandb_project, s = e.get("WB_PROJECT", "WANDB_PROJECT")
    if wandb_project and (e.get("WANDB_MODE")[0] or "online").lower() != "disabled":
        flags += ["--wandb-project", wandb_project]
        note("WANDB_PROJECT", wandb_project, s)
    ds_config_user, s = e.get("DS_CONFIG")
    if ds_config_user is not None and not os.path.isfile(ds_config_user):
        raise LaunchError(f"DS_CONFIG={ds_config_user}: no such file")

    # --- the trainer validates the final list (extra arguments last: they win) ------------
    from megatron_ext.arguments import ArgumentsError, build_parser, finalize_args
    from megatron_ext.training.deepspeed_config import build_deepspeed_config

    parser = build_parser(prog="train_alcf.sh")
    args = _parse_extra(parser, flags + list(extra_args))
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    custom = (layers, hidden) != (preset["num_layers"], preset["hidden_size"])
    gb = args.global_batch_size or (args.micro_batch_size * (args.gradient_accumulation_steps or 1)
                                    * (world // args.tensor_model_parallel_size))
    name = (f"{arch}{'-custom' if custom else ''}-ws{world}-ds-stage{args.zero_stage}-nl{args.num_layers}"
            f"-hs{args.hidden_size}-mb{args.micro_batch_size}-gb{gb}-seq{args.seq_length}"
            f"-opt{args.optimizer}-lr{_fmt_lr(args.lr)}-tp{args.tensor_model_parallel_size}-{precision}"
            # another expert count or MTP depth is another model: never resume the wrong one
            + (f"-moe{args.num_experts}x{args.moe_router_topk or 2}" if args.num_experts else "")
            + (f"-mtp{args.mtp_num_layers}" if args.mtp_num_layers else ""))
    save, save_src = e.get("SAVE")
    run_dir = os.path.abspath(args.save or save or os.path.join(repo, "checkpoints", name))
    load, load_src = e.get("LOAD")
    load_dir = os.path.abspath(args.load or load or run_dir)
    note("SAVE", run_dir, "--save" if args.save else save_src or "default (descriptive name)")
    note("LOAD", load_dir, "--load" if args.load else load_src or "= SAVE")
    ds_config_path = os.path.abspath(ds_config_user) if ds_config_user else os.path.join(run_dir, "ds_config.json")
    flags += ["--save", run_dir, "--load", load_dir]
    if ds_config_user:
        flags += ["--deepspeed-config", ds_config_path]
    args = _parse_extra(parser, flags + list(extra_args))
    try:
        finalize_args(args, world, check_files=False)  # files are checked again right before launch
    except ArgumentsError as err:
        raise LaunchError(str(err)) from None
    _final_batch_and_length(settings, notes, args, tokens)
    ds_config = None
    if not ds_config_user and not args.deepspeed_config:
        ds_config = build_deepspeed_config(args)
        flags += ["--deepspeed-config", ds_config_path]
    note("DS_CONFIG", args.deepspeed_config or ds_config_path, "DS_CONFIG" if ds_config_user else
         "--deepspeed-config" if args.deepspeed_config else "generated from the variables")
    trainer_argv = flags + list(extra_args)

    command = launch_command(e, trainer_argv, hosts, hostfile, ngpu, world, run_dir)
    launcher = os.path.basename(command[0]) if command[0] != sys.executable else (
        "torchrun" if "torch.distributed.run" in command else "python (single process)")
    note("LAUNCH_WITH", launcher, e.get("LAUNCH_WITH", "LAUNCH_CMD")[1] or "auto")
    return Launch(settings, resolved, trainer_argv, command, run_dir, ds_config, ds_config_path, demo, notes)


# MoE / MTP variables -> trainer flags (megatron_ext/moe_mtp.py; docs/moe_mtp.md). Unset: not passed.
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


def _moe_mtp_flags(e: _Env, note) -> List[str]:
    import argparse

    from megatron_ext.moe_mtp import VALUE_TYPES

    flags: List[str] = []
    for names, flag, kind, minimum in MOE_MTP_NUMBERS:
        value, src = e.number(names, None, kind=kind, minimum=minimum)
        if value is not None:
            flags += [flag, str(value)]  # str: a float's shortest exact spelling
            note(names[0], value, src)
    for name, flag in MOE_MTP_WORDS:
        raw, _ = e.get(name)
        if raw is None:
            continue
        try:
            VALUE_TYPES[flag](raw)
        except argparse.ArgumentTypeError as err:
            raise LaunchError(f"{name}={raw!r}: {err}") from None
        flags += [flag, raw]
        note(name, raw, name)
    if e.flag("MOE_ROUTER_PRE_SOFTMAX"):
        flags.append("--moe-router-pre-softmax")
        note("MOE_ROUTER_PRE_SOFTMAX", "1", "MOE_ROUTER_PRE_SOFTMAX")
    return flags


def _final_batch_and_length(settings, notes, args, tokens) -> None:
    """Show the batch and length the trainer will actually use (extra flags included)."""
    tokens_per_iter = args.global_batch_size * args.seq_length
    final = {
        "GRAD_ACC_STEPS": str(args.gradient_accumulation_steps),
        "GLOBAL_BATCH": str(args.global_batch_size),
        "TRAIN_ITERS": str(args.train_iters),
        "TRAIN_TOKENS (trained)": str(args.train_iters * tokens_per_iter),
    }
    for i, (key, value, src) in enumerate(settings):
        if key in final and final[key] != value:
            settings[i] = (key, final[key], src + ", after extra arguments")
    if args.train_tokens is None or args.train_tokens != tokens:
        return
    if args.train_iters != tokens // tokens_per_iter:  # an extra --train-iters wins over TRAIN_TOKENS
        notes.append(f"--train-iters {args.train_iters} wins over TRAIN_TOKENS={tokens}")
        return
    dropped = tokens - args.train_iters * tokens_per_iter
    notes.append(f"TRAIN_TOKENS={tokens} -> TRAIN_ITERS = {tokens} // ({args.seq_length} x "
                 f"{args.global_batch_size}) = {args.train_iters} ({args.train_iters * tokens_per_iter} tokens "
                 f"trained, {dropped} dropped by rounding)")


def _parse_extra(parser, argv):
    """Parse with the trainer's parser; a bad extra argument becomes one LaunchError line."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        message = (err.getvalue().strip().splitlines() or ["invalid arguments"])[-1]
        raise LaunchError(message.split("error: ", 1)[-1]) from None


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
    lines += ["-" * 100, "command:", "  " + shlex.join(launch.command), "=" * 100]
    return "\n".join(lines)
