"""Command-line arguments with the Megatron-DeepSpeed spellings users already type.

* ``--a-b`` and ``--a_b`` are the same flag (argv is normalised to dashes before parsing).
* Booleans are real flags (``store_true`` / ``--x``/``--no-x``), never ``type=bool``.
* Any error is one line naming the flag (with the closest known flag for a typo) and exit code 2.
* Each plug-in family adds the flags of its plug-ins in their own groups (see ``registry``).

Parsing only; defaults that depend on other flags, derived values and every check across flags
are the run plan's (``megatron_ext.plan``).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import List, Optional

from megatron_ext import registry
from megatron_ext.argtypes import (choice_ci, close_hint, finite_float, fraction, nonneg_float, nonneg_int,
                                   normalise_argv, one_line_errors, positive_float, positive_int)
from megatron_ext.data.tokenizers import FLAGSCALE_TYPES
from megatron_ext.models import features
from megatron_ext.models.llama_moe_names import add_llama_moe_names
from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.parametrizations import PARAMETRIZATIONS
from megatron_ext.parametrizations.common.base import init_std
from megatron_ext.planning.arguments import add_plan_arguments
from megatron_ext.schedules import SCHEDULES
from megatron_ext.schedules.common.scheduler import add_schedule_arguments
from megatron_ext.training.evaluation import add_corpus_eval_arguments, add_mc_eval_arguments
from megatron_ext.training.lr_finder import add_lr_finder_arguments

MODEL_STYLES = {
    # Llama-style: swiglu, rmsnorm, rotary, no bias, untied embeddings, no dropout.
    "llama": dict(
        swiglu=True,
        normalization="RMSNorm",
        position_embedding_type="rope",
        untie_embeddings_and_output_weights=True,
        add_bias_linear=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    ),
    "gpt2": dict(
        swiglu=False,
        normalization="LayerNorm",
        position_embedding_type="learned_absolute",
        untie_embeddings_and_output_weights=False,
        add_bias_linear=True,
        attention_dropout=0.1,
        hidden_dropout=0.1,
    ),
}

TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "HFTokenizer",
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "NullTokenizer",
    *FLAGSCALE_TYPES,  # HFTokenizer with FlagScale's end-of-document token (data/tokenizers.py)
)


class ArgumentsError(ValueError):
    """An invalid combination of arguments, found after parsing; the message is one line."""


class MegatronArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors and dash/underscore-insensitive long options."""

    def __init__(self, *a, **kw):
        kw.setdefault("allow_abbrev", False)  # an abbreviation silently picking a flag is a trap
        super().__init__(*a, **kw)
        # argparse takes "-1e-3" (a negative number in exponent form) for an option and reports
        # "expected one argument"; every negative number, however written, is a value here.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$",
                                                   re.IGNORECASE)
        one_line_errors(self)

    def parse_args(self, args=None, namespace=None):
        argv = normalise_argv(sys.argv[1:] if args is None else list(args))
        ns, unknown = self.parse_known_args(argv, namespace)
        if unknown:
            self.error(self.unknown_message(unknown))
        return ns

    def unknown_message(self, unknown: List[str]) -> str:
        flags = [u for u in unknown if u.startswith("-")]
        if not flags:
            return f"unexpected argument {unknown[0]!r}"
        flag = flags[0].split("=", 1)[0]
        hint = close_hint(flag, self._option_string_actions, quote=False)
        more = f" (and {len(flags) - 1} more: {' '.join(flags[1:])})" if len(flags) > 1 else ""
        return f"unrecognized argument {flag}{hint}{more}"


def _split(value: str) -> str:
    """train,valid,test weights; fewer than 3 numbers get zeros, as in Megatron (``1`` = all train)."""
    parts = [p.strip() for p in str(value).replace("/", ",").split(",")]
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers like 990,10,0, got {value!r}") from None
    if not 1 <= len(nums) <= 3 or any(not math.isfinite(n) or n < 0 for n in nums) or sum(nums) <= 0:
        raise argparse.ArgumentTypeError(f"expected 3 non-negative comma-separated numbers like 990,10,0, got {value!r}")
    return ",".join(parts + ["0"] * (3 - len(parts)))


def add_init_arguments(g) -> None:

    g.add_argument("--init-method-std", type=init_std, default=0.02,
                   help="std of the weight init, or 'auto' = sqrt(2/(5*hidden)) (default 0.02); under mup/completep "
                        "the std at the base width")
    g.add_argument("--scaled-output-projection-init", action=argparse.BooleanOptionalAction, default=True,
                   help="each block's output projections (attention out, MLP down) at std/sqrt(2*layers) "
                        "(default on; completep always drops it)")
    g.add_argument("--adjust-word-embedding-init", action="store_true",
                   help="initialise the word embeddings at --word-embedding-init-std instead of --init-method-std")
    g.add_argument("--word-embedding-init-std", type=nonneg_float, default=math.sqrt(2 / 5),
                   help="embedding std with --adjust-word-embedding-init (default sqrt(2/5) = 0.632, Spike No More)")
    g.add_argument("--output-layer-init-std", type=nonneg_float, default=None,
                   help="std of the untied output layer (default: --init-method-std)")
    g.add_argument("--parametrization", type=PARAMETRIZATIONS.argument_type, default=None,
                   help=f"one of: {', '.join(PARAMETRIZATIONS.names())} (default sp)")


# Flags the ALCF fork's launcher (ALCF/helpers.sh) passes that change nothing in this trainer:
# accepted, and each one given is said once at start-up (the run plan's notes), never silently.
# (flag, argparse kwargs, what it means here)
MEGATRON_DEEPSPEED_NO_OPS = (
    ("--no-bias-gelu-fusion", {}, "fusions are always off here: the plain torch paths run"),
    ("--no-bias-dropout-fusion", {}, "fusions are always off here: the plain torch paths run"),
    ("--no-masked-softmax-fusion", {}, "fusions are always off here: the plain torch paths run"),
    ("--no-gradient-accumulation-fusion", {}, "fusions are always off here: the plain torch paths run"),
    ("--no-query-key-layer-scaling", {}, "query-key layer scaling is always off here (megatron-core's default)"),
    ("--deepspeed-activation-checkpointing", {},
     "activation recomputation is megatron-core's (--recompute-activations); DeepSpeed's is not used"),
    ("--shuffle-sample-in-corpus", {}, "megatron-core's GPTDataset already shuffles the samples of every corpus"),
    ("--blend-sample-in-corpus", {}, "the blend of a data file list is megatron-core's, by corpus weight"),
    ("--log-timers-to-tensorboard", {}, "timers are not written to TensorBoard; the log line has the step time"),
    ("--log-optimizer-states-to-tensorboard", {}, "optimizer states are not written to TensorBoard"),
    ("--timing-log-level", {"type": int}, "timers are not logged by level; the log line has the step time"),
)


def _no_op_dest(flag: str) -> str:
    return "megatron_deepspeed_" + flag.lstrip("-").replace("-", "_")


def given_no_op_flags(args) -> List[str]:
    """Notes for the accepted-but-inert Megatron-DeepSpeed flags ``args`` carries."""
    return [f"{flag}: accepted for Megatron-DeepSpeed compatibility; {meaning}"
            for flag, _, meaning in MEGATRON_DEEPSPEED_NO_OPS if getattr(args, _no_op_dest(flag), None) not in (None, False)]


def build_parser(prog: str = "megatron_ext.train") -> MegatronArgumentParser:
    registry.load_plugins()

    p = MegatronArgumentParser(
        prog=prog,
        description="Megatron-DeepSpeed compatible pretraining on megatron-core + DeepSpeed.",
    )

    g = p.add_argument_group("model")
    g.add_argument("--model-style", choices=sorted(MODEL_STYLES), default="llama",
                   help="defaults for the architecture flags below (llama: swiglu, RMSNorm, rotary, "
                        "no bias, untied embeddings, no dropout; gpt2: gelu, LayerNorm, learned "
                        "positions, biases, tied embeddings, dropout 0.1)")
    g.add_argument("--num-layers", type=positive_int, default=2)
    g.add_argument("--hidden-size", type=positive_int, default=64)
    g.add_argument("--ffn-hidden-size", type=positive_int, default=None,
                   help="default 4*hidden (gelu) or 8/3*hidden rounded up to a multiple of 64 (swiglu)")
    g.add_argument("--num-attention-heads", type=positive_int, default=4)
    g.add_argument("--num-key-value-heads", "--num-query-groups", dest="num_key_value_heads",
                   type=positive_int, default=None, help="grouped-query attention; default = heads")
    g.add_argument("--group-query-attention", action="store_true",
                   help="accepted for Megatron compatibility; GQA is on whenever kv heads < heads")
    g.add_argument("--seq-length", type=positive_int, default=128)
    g.add_argument("--max-position-embeddings", type=positive_int, default=None, help="default = seq length")
    g.add_argument("--normalization", type=choice_ci("RMSNorm", "LayerNorm"), default=None)
    g.add_argument("--norm-epsilon", type=finite_float, default=1e-5)
    g.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"], default=None)
    g.add_argument("--use-rotary-position-embeddings", dest="position_embedding_type",
                   action="store_const", const="rope")
    g.add_argument("--rope-theta", "--rotary-base", "--rotary-position-embeddings-theta", dest="rope_theta",
                   type=finite_float, default=10000.0)
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama 3.x rotary frequency scaling (megatron-core: low/high frequency factors 1 and 4, "
                        "original context 8192); models imported with megatron-ext import-hf set it")
    g.add_argument("--rope-scaling-factor", type=positive_float, default=8.0,
                   help="factor of --use-rope-scaling (Llama 3.1: 8, Llama 3.2: 32)")
    g.add_argument("--untie-embeddings-and-output-weights", dest="untie_embeddings_and_output_weights",
                   action="store_const", const=True, default=None)
    g.add_argument("--tie-embeddings-and-output-weights", dest="untie_embeddings_and_output_weights",
                   action="store_const", const=False)
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_const", const=False,
                   default=None)
    g.add_argument("--add-bias-linear", dest="add_bias_linear", action="store_const", const=True)
    g.add_argument("--attention-dropout", type=fraction, default=None)
    g.add_argument("--hidden-dropout", type=fraction, default=None)
    g.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=128)
    features.add_arguments(p)  # each model feature's flags (megatron_ext/models/features)
    add_init_arguments(p.add_argument_group("initialisation and parametrization"))

    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="PREFIX, or W1 PREFIX1 W2 PREFIX2 ... (Megatron form)")
    g.add_argument("--data-file-list", default=None,
                   help="file of 'weight path-prefix corpus' lines (# comments allowed)")
    g.add_argument("--mock-data", action="store_true", help="synthetic tokens, no files (smoke tests)")
    g.add_argument("--split", type=_split, default="969,30,1", help="train,valid,test weights")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="positions restart at 0 after every end-of-document token inside a sequence")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="tokens after an end-of-document token do not attend to the tokens before it")
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="no loss where the input token is the end-of-document token (the prediction of the next "
                        "document's first token)")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--num-workers", type=nonneg_int, default=None,
                   help="data loader workers (default 2 with an accelerator, 0 on CPU)")
    g.add_argument("--tokenizer-type", type=choice_ci(*TOKENIZER_TYPES), default="SentencePieceTokenizer")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=positive_int, default=None, help="NullTokenizer / mock data")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=positive_int, default=1)
    g.add_argument("--global-batch-size", type=positive_int, default=None,
                   help="default = micro batch x data-parallel size x accumulation steps")
    g.add_argument("--gradient-accumulation-steps", type=positive_int, default=None)
    g.add_argument("--train-iters", type=positive_int, default=None)
    g.add_argument("--train-samples", type=positive_int, default=None)
    g.add_argument("--train-tokens", type=positive_int, default=None,
                   help="iterations = tokens // (seq length x global batch)")
    g.add_argument("--seed", type=nonneg_int, default=1234)
    g.add_argument("--optimizer", type=OPTIMIZERS.argument_type, default="adamw",
                   help=f"one of: {', '.join(OPTIMIZERS.names())}")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.01)
    g.add_argument("--clip-grad", type=nonneg_float, default=1.0, help="0 disables clipping")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="with --bf16: accumulate and reduce gradients in fp32 (DeepSpeed's bf16 optimizer; ZeRO 1 "
                        "only, noted otherwise)")
    g.add_argument("--recompute-activations", "--checkpoint-activations", dest="recompute_activations",
                   action="store_true", help="activation checkpointing: recompute whole layers in backward")
    g.add_argument("--recompute-num-layers", "--checkpoint-num-layers", dest="recompute_num_layers",
                   type=positive_int, default=1,
                   help="layers per checkpointed chunk (with --recompute-activations)")
    g.add_argument("--exit-interval", type=positive_int, default=None,
                   help="stop (after saving) once the iteration is a multiple of this")

    add_schedule_arguments(p.add_argument_group("learning rate"))

    g = p.add_argument_group("parallelism and DeepSpeed")
    g.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--no-pipeline-parallel", action="store_true", help="accepted; pipelining is off")
    g.add_argument("--deepspeed", action="store_true", help="accepted; DeepSpeed is always used")
    g.add_argument("--ds-sequence-parallel-size", type=positive_int, default=1,
                   help="DeepSpeed-Ulysses sequence parallelism: only 1 (not supported yet)")
    g.add_argument("--deepspeed-config", default=None,
                   help="a DeepSpeed JSON config; its settings win, batch sizes must agree with the flags")
    g.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=1)
    g.add_argument("--cpu-optimizer", action="store_true",
                   help="ZeRO-Offload: optimizer states and step on the CPU (needs --zero-stage >= 1)")
    g.add_argument("--distributed-backend", choices=["nccl", "ccl", "gloo", "mpi"], default=None,
                   help="default: what the accelerator wants (nccl, ccl, gloo on CPU)")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=positive_int, default=None)
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--no-load-optim", action="store_true",
                   help="load weights, iteration and schedule but start a fresh optimizer")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only: fresh optimizer, schedule, iteration and data position")
    g.add_argument("--universal-checkpoint", action="store_true",
                   help="load the universal checkpoint 'latest_universal' names in --load (made by megatron-ext "
                        "to-universal): any data-parallel and tensor-parallel size, ZeRO 1 or 2 (docs/checkpoints.md)")
    g.add_argument("--restart-from-load", action="store_true",
                   help="with --finetune / --universal-checkpoint and a --save that already holds this run's "
                        "checkpoint: start over from --load (default: resume the run from --save)")
    g.add_argument("--keep-last", type=positive_int, default=None, metavar="N",
                   help="after each complete save keep only N global_stepN checkpoints in --save: the one "
                        "'latest' names and the newest others (docs/checkpoints.md)")
    g.add_argument("--exit-signal-handler", action=argparse.BooleanOptionalAction, default=False,
                   help="on SIGTERM or SIGUSR1 (batch walltime) every rank stops after the current iteration, "
                        "saves and exits with code 0 (the launcher turns this on)")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=positive_int, default=1000)
    g.add_argument("--eval-iters", type=nonneg_int, default=10)
    g.add_argument("--eval-at-start", action="store_true",
                   help="also evaluate before the first iteration of a fresh run (the starting loss)")
    g.add_argument("--log-interval", type=positive_int, default=1)
    g.add_argument("--metrics-file", default=None,
                   help="JSON lines of every logged iteration and evaluation (default <save>/metrics.jsonl)")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--no-tensorboard", action="store_true")
    g.add_argument("--wandb-project", default=None, help="log to Weights & Biases (when wandb is installed)")
    g.add_argument("--wandb-exp-name", default=None)
    add_corpus_eval_arguments(g)
    add_mc_eval_arguments(p.add_argument_group("multiple-choice evaluation"))

    g = p.add_argument_group("accepted for Megatron-DeepSpeed compatibility (no effect; each is noted at start-up)")
    for flag, kwargs, meaning in MEGATRON_DEEPSPEED_NO_OPS:
        action = {"default": None} if kwargs else {"action": "store_true"}
        g.add_argument(flag, dest=_no_op_dest(flag), help=meaning, **kwargs, **action)

    add_lr_finder_arguments(p.add_argument_group("LR finder"))
    add_plan_arguments(p.add_argument_group("memory and time plan (docs/memory_plan.md)"))

    for family in (OPTIMIZERS, SCHEDULES, PARAMETRIZATIONS):
        family.add_arguments(p)
    for fam in registry.families().values():  # families added by third-party plug-ins
        if fam not in (OPTIMIZERS, SCHEDULES, PARAMETRIZATIONS):
            fam.add_arguments(p)
    add_llama_moe_names(p)  # LLaMA-MoE's spellings of some of the flags above (megatron_ext/models/llama_moe_names.py)
    return p
