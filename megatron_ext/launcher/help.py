"""``bash train_alcf.sh --help``: the variables the launcher reads (with their defaults), the
``MODEL_ARCH`` presets, then the trainer's own flags."""
from __future__ import annotations

from megatron_ext.launcher.presets import MODEL_PRESETS
from megatron_ext.launcher.resolve import DEFAULT_TRAIN_TOKENS, DEMO_DEFAULTS, DEMO_TRAIN_ITERS, LAUNCHER_DEFAULTS

_EVAL_LOG = ("EVAL_INTERVAL", "EVAL_ITERS", "LOG_INTERVAL")

# (variables, default, what it becomes); the defaults come from resolve.py where it keeps them.
VARIABLES = (
    ("DATA_FILE_LIST", "the demo corpus", "--data-file-list (lines 'weight prefix corpus')"),
    ("TOKENIZER_TYPE, TOKENIZER_MODEL", "HFTokenizer, google/gemma-7B (demo: its SentencePiece model, unless "
     "set: then the demo corpus is tokenized with yours)",
     "--tokenizer-type, --tokenizer-model (a file, a folder or a hub name in the local cache)"),
    ("DATA_CACHE_PATH", ".cache/index-cache", "--data-cache-path"),
    ("TRAIN_ITERS (TRAIN_ITER)", f"demo: {DEMO_TRAIN_ITERS}", "--train-iters; wins over TRAIN_TOKENS"),
    ("TRAIN_TOKENS", f"{DEFAULT_TRAIN_TOKENS:.0e}", "--train-tokens (iterations = tokens // (SEQ x GLOBAL_BATCH))"),
    ("MICRO_BATCH", f"{LAUNCHER_DEFAULTS['MICRO_BATCH']} (demo: {DEMO_DEFAULTS['MICRO_BATCH']})", "--micro-batch-size"),
    ("GRAD_ACC_STEPS", "1", "--gradient-accumulation-steps"),
    ("GLOBAL_BATCH", "data-parallel x MICRO_BATCH x GRAD_ACC_STEPS", "--global-batch-size"),
    ("LR", f"{LAUNCHER_DEFAULTS['LR']} (demo: {DEMO_DEFAULTS['LR']})", "--lr (exactly as typed)"),
    ("LR_DECAY_STYLE", "cosine", "--lr-decay-style (megatron-ext list: every schedule)"),
    ("LR_WARMUP_FRAC (LR_WARMUP_FRACTION)", str(LAUNCHER_DEFAULTS["LR_WARMUP_FRAC"]), "--lr-warmup-fraction"),
    ("LR_DECAY_ITERS", "train iterations", "--lr-decay-iters"),
    ("OPT (OPTIMIZER, OPTIM)", "adamw", "--optimizer (megatron-ext list: every optimizer)"),
    ("ADAM_BETA1, ADAM_BETA2, ADAM_EPS",
     f"{LAUNCHER_DEFAULTS['ADAM_BETA1']}, {LAUNCHER_DEFAULTS['ADAM_BETA2']}, {LAUNCHER_DEFAULTS['ADAM_EPS']}",
     "--adam-beta1, --adam-beta2, --adam-eps"),
    ("WEIGHT_DECAY, CLIP_GRAD", f"{LAUNCHER_DEFAULTS['WEIGHT_DECAY']}, {LAUNCHER_DEFAULTS['CLIP_GRAD']}",
     "--weight-decay, --clip-grad"),
    ("MODEL_ARCH", "tiny without accelerator, else 7B", "a preset (below)"),
    ("NLAYERS (NUM_LAYERS), HIDDEN, HEADS (NHEADS), NUM_KV_HEAD, FFN_HIDDEN_SIZE", "preset", "the model shape"),
    ("SEQ (SEQ_LEN), ROPE_THETA", "preset", "--seq-length, --rope-theta"),
    ("NO_LLAMA", "unset: llama style", "set: --model-style gpt2"),
    ("TP, PP, EP (EP_PARALLEL_SIZE), SP", "1, 1, 1, 1", "--tensor-model-parallel-size, --pipeline-model-parallel-size, "
     "--expert-model-parallel-size, --ds-sequence-parallel-size (SP must be 1: not supported yet); "
     "docs/parallelism.md"),
    ("ZERO_STAGE", "1", "--zero-stage"),
    ("DTYPE", "bf16 (fp32 on CPU)", "--bf16 / --fp16 / fp32"),
    ("USE_ACTIVATION_CHECKPOINTING, ACT_CKPT_NUM_LAYERS", "off, 1", "--recompute-activations --recompute-num-layers"),
    ("CPU_OPTIMIZER", "off", "--cpu-optimizer"),
    ("INIT_METHOD_STD", "0.02", "--init-method-std (a number or auto)"),
    ("MUP_BASE_WIDTH, DEPTH_BASE", "unset", "--parametrization mup / completep with their base shapes"),
    ("NUM_EXPERTS, MOE_TOPK, ... MTP_NUM_LAYERS", "unset: dense", "MoE / MTP flags (README, docs/moe_mtp.md)"),
    ("SAVE, LOAD", "checkpoints/<descriptive name>; LOAD = SAVE", "--save, --load"),
    ("SAVE_INTERVAL", f"{LAUNCHER_DEFAULTS['SAVE_INTERVAL']} (demo: {DEMO_DEFAULTS['SAVE_INTERVAL']})", "--save-interval"),
    ("OVERRIDE_CKPT_OPT_PARAM", "unset: --use-checkpoint-opt-param-scheduler", "set: --override-opt-param-scheduler"),
    ("EVAL_INTERVAL, EVAL_ITERS, LOG_INTERVAL", ", ".join(str(LAUNCHER_DEFAULTS[v]) for v in _EVAL_LOG)
     + " (demo: " + ", ".join(str(DEMO_DEFAULTS[v]) for v in _EVAL_LOG) + ")",
     "--eval-interval, --eval-iters, --log-interval"),
    ("TRAIN_SPLIT, VAL_SPLIT, TEST_SPLIT", ", ".join(LAUNCHER_DEFAULTS[v] for v in ("TRAIN_SPLIT", "VAL_SPLIT", "TEST_SPLIT")),
     "--split"),
    ("SEED", str(LAUNCHER_DEFAULTS["SEED"]), "--seed"),
    ("NO_TENSORBOARD, WB_PROJECT (WANDB_PROJECT), WANDB_MODE", "unset", "--no-tensorboard, --wandb-project"),
    ("DS_CONFIG", "generated into the run directory", "--deepspeed-config (its keys win)"),
    ("HOSTFILE (PBS_NODEFILE), NGPU_PER_HOST", "this host; detected devices", "world size = hosts x NGPU_PER_HOST"),
    ("LAUNCH_WITH (LAUNCH_CMD)", "ezpz / mpiexec with a hostfile, torchrun for several local ranks, else python",
     "mpiexec, ezpz, torchrun, deepspeed, python"),
    ("EXEC", "-m megatron_ext.train", "a script or module to run instead"),
    ("DRY_RUN", "unset", "1: print the resolved settings, the run plan and the command; start nothing"),
)


def launcher_help() -> str:
    width = max(len(v) for v, _, _ in VARIABLES)
    lines = ["usage: VAR=... bash train_alcf.sh [trainer flags]",
             "",
             "The variables of Megatron-DeepSpeed's train_alcf.sh become trainer flags; extra flags after the",
             "script always win. With no variables on a machine without an accelerator it trains the demo.",
             "",
             "variables (default; what it becomes):"]
    lines += [f"  {v:<{width}}  {d}; {what}" for v, d, what in VARIABLES]
    lines += ["", "MODEL_ARCH presets (layers/hidden/ffn/heads/kv heads/seq/rope theta):"]
    for name, p in MODEL_PRESETS.items():
        lines.append(f"  {name:<12} {p['num_layers']}/{p['hidden_size']}/{p['ffn_hidden_size']}/"
                     f"{p['num_attention_heads']}/{p['num_key_value_heads']}/{p['seq_length']}/{p['rope_theta']:g}")
    lines += ["", "The trainer's flags (python -m megatron_ext.train --help):", ""]
    return "\n".join(lines)
