"""The run plan: everything a run will do, resolved once from the parsed flags and the world size.

``build_plan(args, world_size)`` fills every default and derived value (model shape, batch,
accumulation, length, the DeepSpeed config with the user's JSON merged and so the final ZeRO stage,
the tokenizer and data files, the LR schedule, the parametrization, the selected plug-ins checked
against that engine) and returns a frozen ``RunPlan``. Validation IS building the plan: any problem
is one ``ArgumentsError`` line, before any work starts. The trainer runs a plan
(``training.trainer.pretrain(plan)``), the launcher prints one (``DRY_RUN=1``), and tools that need
the resolved flags (``megatron-ext schedule``, ``cooldown``, ``init-report``, sweeps) build one.

After planning ``plan.args`` is read-only: a component that needs another derived value gets it
from the plan, it never writes it into ``args``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_ext import derivations
from megatron_ext.arguments import MODEL_STYLES, ArgumentsError, build_parser, given_no_op_flags
from megatron_ext.registry import EngineSettings
from megatron_ext import registry
from megatron_ext.checkpoint_layout import CheckpointFileError, client_state, read_latest
from megatron_ext.data.data_checks import check_data_files
from megatron_ext.data.gpt_data import data_sources, tokenizer_for
from megatron_ext.models import features
from megatron_ext.models.gpt import padded_vocab_size
from megatron_ext.parametrizations import parametrization_for
from megatron_ext.planning import plan_rows
from megatron_ext.platform.accelerator import has_gpu
from megatron_ext.platform.distributed import discover
from megatron_ext.schedules.common.scheduler import build_schedule
from megatron_ext.training.checkpoint_loading import check_load_dir
from megatron_ext.training.deepspeed_config import build_deepspeed_config, engine_settings, fp32_gradient_accumulation
from megatron_ext.training.evaluation import check_corpus_eval, mc_examples_for
from megatron_ext.training.lr_finder import validate_lr_finder_args


class ResolvedArgs(argparse.Namespace):
    """The flags of a plan: every value filled in; setting an attribute afterwards is an error."""

    def __setattr__(self, name, value):
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"args.{name}: the run plan's flags are read-only (derive it in megatron_ext/plan.py)")
        super().__setattr__(name, value)

    def freeze(self) -> "ResolvedArgs":
        self.__dict__["_frozen"] = True
        return self

    def __getstate__(self):  # pickles (DeepSpeed client state, spawn) as a plain namespace
        return {k: v for k, v in self.__dict__.items() if k != "_frozen"}

    def __setstate__(self, state):
        self.__dict__.update(state)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    args: ResolvedArgs
    world_size: int
    data_parallel_size: int
    engine: EngineSettings  # final ZeRO stage (the user's DeepSpeed JSON merged), offload, TP, precision
    ds_config: Dict[str, Any]
    schedule: Any  # schedules.common.scheduler.LRSchedule
    parametrization: Any  # parametrizations.common.base.Parametrization
    plugins: Dict[str, Any]  # family -> the selected plug-in's record
    data_sources: Optional[list]  # (weight, prefix, corpus); None for mock data
    tokenizer: Any  # None when files were not checked (check_files=False)
    mc_examples: Optional[tuple]  # --eval-mc-file, read and tokenized
    notes: Tuple[str, ...]  # what the user should know about how the flags were resolved

    @property
    def tokens_per_iteration(self) -> int:
        return self.args.global_batch_size * self.args.seq_length

    def rows(self) -> List[Tuple[str, Any]]:
        """What the run will be, as (label, value) rows: the start-up block and the launcher's dry run."""

        a = self.args
        feature_rows = features.summary_rows(a)  # (megatron_ext/models/features)
        rows = [
            ("world size", self.world_size),
            ("data-parallel size", self.data_parallel_size),
            ("tensor-parallel size", a.tensor_model_parallel_size),
            *((("pipeline-parallel size", f"{a.pipeline_model_parallel_size} ({a.num_layers // a.pipeline_model_parallel_size}"
                 " layers a stage)"),) if a.pipeline_model_parallel_size > 1 else ()),
            *((("expert-parallel size", f"{a.expert_model_parallel_size} ({a.num_experts // a.expert_model_parallel_size}"
                f" experts a rank, expert-data-parallel size {a.expert_data_parallel_size})"),)
              if a.expert_model_parallel_size > 1 else ()),
            ("ZeRO stage", self.engine.zero_stage),
            ("precision", self.engine.precision),
            ("micro batch", a.micro_batch_size),
            ("gradient accumulation", a.gradient_accumulation_steps),
            ("global batch", a.global_batch_size),
            ("sequence length", a.seq_length),
            *((label, line) for label, line in feature_rows.items() if label == "attention"),
            ("tokens per step", f"{self.tokens_per_iteration:,}"),
            ("train iterations", a.train_iters),
            ("train tokens", f"{a.train_iters * self.tokens_per_iteration:,}"),
            ("optimizer", self._optimizer_line()),
            ("lr schedule", f"{a.lr_decay_style} (lr {a.lr:g}, min {a.min_lr:g})"),
            ("parametrization", self.parametrization.summary()),
        ]
        rows += [(label, line) for label, line in feature_rows.items() if label != "attention"]
        documents = [f for f, on in (("positions reset", a.reset_position_ids), ("attention within documents",
                     a.reset_attention_mask), ("no loss on end-of-document inputs", a.eod_mask_loss)) if on]
        if documents:
            rows.append(("document boundaries", ", ".join(documents)))
        if a.vocab_size_unpadded is not None:
            rows.append(("vocabulary", f"{a.vocab_size_unpadded} (padded {a.padded_vocab_size})"))

        return rows + plan_rows(self)  # memory per device by term, step time, run length (docs/memory_plan.md)

    def _optimizer_line(self) -> str:
        plugin = self.plugins.get("optimizer")
        summary = plugin.summary(self.args) if plugin is not None and plugin.summary is not None else ""
        return f"{self.args.optimizer} ({summary})" if summary else self.args.optimizer


# --------------------------------------------------------------------------------------------
# Building the plan
# --------------------------------------------------------------------------------------------


def parse_plan(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None,
               prog: str = "megatron_ext.train") -> RunPlan:
    """Parse ``argv`` and plan; exits with one error line (code 2) on bad input."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if world_size is None:

        world_size = discover().world_size
    try:
        return build_plan(args, world_size)
    except ArgumentsError as e:
        parser.error(str(e))


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """The resolved flags of ``parse_plan`` (for code that only needs them)."""
    return parse_plan(argv, world_size).args


def parse_or_problem(parser, argv: Sequence[str]) -> Tuple[Optional[argparse.Namespace], Optional[str]]:
    """``parser.parse_args(argv)`` without printing or exiting: ``(args, None)``, or ``(None, the
    parser's one-line error)``, for callers that report it in their own words."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv), None
    except SystemExit:
        return None, (err.getvalue().strip().splitlines() or ["invalid arguments"])[-1].split("error: ", 1)[-1]


def plan_or_problem(parser, argv: Sequence[str], world_size: int,
                    check_files: bool = True) -> Tuple[Optional[RunPlan], Optional[str]]:
    """``(plan, None)`` for ``argv``, or ``(None, the trainer's one-line error)``: the parser's or the plan's."""
    args, problem = parse_or_problem(parser, argv)
    if problem is not None:
        return None, problem
    try:
        return build_plan(args, world_size, check_files), None
    except ArgumentsError as e:
        return None, str(e)


def build_plan(args: argparse.Namespace, world_size: int, check_files: bool = True) -> RunPlan:
    """Resolve and check ``args`` for ``world_size`` ranks; raises ArgumentsError (one line).

    ``args`` is not modified. ``check_files=False`` skips what needs the files the flags name
    (tokenizer, data prefixes, --eval-mc-file): the launcher plans the demo before building it."""
    a = ResolvedArgs(**{k: v for k, v in vars(args).items() if k != "_frozen"})
    notes: List[str] = []
    try:
        _model_shape(a)
        _model_features(a)
        _batch(a, world_size)
        _length(a, notes)
        _data_flags(a)
        _resume_own_checkpoint(a, notes)
        _checkpoint_flags(a)
        ds_config, engine = _deepspeed(a, check_files, notes)
        plugins = _check_plugins(a, engine)
        schedule = _schedule(a)
        _lr_finder(a)
        notes.extend(given_no_op_flags(a))
        # the flags agree with each other: now what they name on disk
        sources, tokenizer = _files(a, check_files, notes)
        if check_files:
            _paths(a)
        mc_examples = _mc_eval(a, tokenizer, sources, notes)
    except (ValueError, OSError) as e:  # ArgumentsError, and the one-line errors of the parts used here
        raise ArgumentsError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None

    parametrization = parametrization_for(a)
    a.freeze()
    return RunPlan(args=a, world_size=world_size, data_parallel_size=a.data_parallel_size, engine=engine,
                   ds_config=ds_config, schedule=schedule, parametrization=parametrization, plugins=plugins,
                   data_sources=sources, tokenizer=tokenizer, mc_examples=mc_examples, notes=tuple(notes))


def _model_shape(a) -> None:
    a.parametrization = derivations.parametrization_name(a)
    for key, value in MODEL_STYLES[a.model_style].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    tp = a.tensor_model_parallel_size
    if a.ds_sequence_parallel_size != 1:
        raise ArgumentsError(f"--ds-sequence-parallel-size {a.ds_sequence_parallel_size}: sequence parallelism "
                             "(DeepSpeed-Ulysses) is not supported yet; use 1, and for long sequences cut activation memory with "
                             "--tensor-model-parallel-size, --pipeline-model-parallel-size or --recompute-activations")
    derivations.layers_per_stage(a.num_layers, a.pipeline_model_parallel_size)
    if a.num_attention_heads % tp:
        raise ArgumentsError(f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads "
                             f"{a.num_attention_heads}")
    if a.hidden_size % a.num_attention_heads:
        raise ArgumentsError(f"--num-attention-heads {a.num_attention_heads} does not divide --hidden-size "
                             f"{a.hidden_size}")
    if a.num_key_value_heads is None:
        a.num_key_value_heads = a.num_attention_heads
    if a.num_attention_heads % a.num_key_value_heads:
        raise ArgumentsError(f"--num-key-value-heads {a.num_key_value_heads} does not divide "
                             f"--num-attention-heads {a.num_attention_heads}")
    if a.num_key_value_heads % tp:
        raise ArgumentsError(f"--tensor-model-parallel-size {tp} does not divide --num-key-value-heads "
                             f"{a.num_key_value_heads}")
    if a.ffn_hidden_size is None:
        a.ffn_hidden_size = int(math.ceil(8 * a.hidden_size / 3 / 64) * 64) if a.swiglu else 4 * a.hidden_size
    if a.max_position_embeddings is None:
        a.max_position_embeddings = a.seq_length
    if a.position_embedding_type == "learned_absolute" and a.max_position_embeddings < a.seq_length:
        raise ArgumentsError(f"--max-position-embeddings {a.max_position_embeddings} is smaller than "
                             f"--seq-length {a.seq_length}")
    if a.recompute_activations and a.num_layers % a.recompute_num_layers:
        raise ArgumentsError(f"--recompute-num-layers {a.recompute_num_layers} does not divide --num-layers "
                             f"{a.num_layers}")
    if a.bf16 and a.fp16:
        raise ArgumentsError("--bf16 and --fp16 are mutually exclusive")


def _model_features(a) -> None:
    """Each model feature's defaults, checks and derived fields (megatron_ext/models/features:
    --attention-backend, --multi-latent-attention, --num-experts...), on the final model shape."""

    features.validate(a)


def _batch(a, world_size: int) -> None:
    a.world_size = world_size
    a.data_parallel_size = derivations.data_parallel_size(world_size, a.tensor_model_parallel_size,
                                                          a.pipeline_model_parallel_size)
    a.expert_data_parallel_size = derivations.expert_data_parallel_size(
        a.data_parallel_size, a.expert_model_parallel_size, a.num_experts)
    a.global_batch_size, a.gradient_accumulation_steps = derivations.batch_sizes(
        a.micro_batch_size, a.global_batch_size, a.gradient_accumulation_steps, a.data_parallel_size)


def _length(a, notes: List[str]) -> None:
    """Iterations win, then samples, then tokens (each rounding down, said in a note)."""
    a.train_iters, length_notes = derivations.train_iterations(
        a.train_iters, a.train_samples, a.train_tokens, a.global_batch_size, a.seq_length)
    if a.train_iters is None:
        raise ArgumentsError("no training length: give --train-iters, --train-samples or --train-tokens")
    notes.extend(length_notes)


def _data_flags(a) -> None:
    if not a.mock_data and not a.data_path and not a.data_file_list:
        raise ArgumentsError("no training data: give --data-file-list, --data-path or --mock-data")
    if a.data_path and a.data_file_list:
        raise ArgumentsError("give either --data-path or --data-file-list, not both")
    if a.mock_data and a.vocab_size is None and a.tokenizer_model is None:
        a.vocab_size = 1024
    if a.num_workers is None:

        a.num_workers = 2 if has_gpu() else 0


def _resume_own_checkpoint(a, notes: List[str]) -> None:
    """A continual-pretraining job (``--load PRETRAINED --save CPT --finetune`` or
    ``--universal-checkpoint``) re-queued with the same command would start over from PRETRAINED
    every time: when --save already holds a checkpoint this run wrote (its saved --load is this
    --load), the run resumes from it instead, and says so. ``--restart-from-load`` starts over."""

    if not (a.load and a.save and (a.finetune or a.universal_checkpoint) and not a.restart_from_load):
        return
    load, save = os.path.abspath(a.load), os.path.abspath(a.save)
    tag = read_latest(save) if load != save else None
    if tag is None:
        return
    try:
        saved = client_state(os.path.join(save, tag)).get("args") or {}
    except CheckpointFileError:
        return  # not this run's: loading reports what is wrong with it when it is used
    if os.path.abspath(saved.get("load") or "") != load:
        return
    notes.append(f"--save {a.save} already holds this run's checkpoint {tag} (it started from --load {a.load}): "
                 f"resuming from it, not from --load again (--restart-from-load starts over)")
    a.load, a.finetune, a.universal_checkpoint = a.save, False, False


def _checkpoint_flags(a) -> None:
    if a.save_interval is not None and not a.save:
        raise ArgumentsError("--save-interval needs --save DIR")
    if a.finetune and not a.load:
        raise ArgumentsError("--finetune needs --load DIR")
    if a.universal_checkpoint and not a.load:
        raise ArgumentsError("--universal-checkpoint needs --load DIR")
    if a.keep_last is not None and not a.save:
        raise ArgumentsError("--keep-last needs --save DIR")
    if a.tensorboard_dir is None and a.save and not a.no_tensorboard:
        a.tensorboard_dir = os.path.join(a.save, "tensorboard")


def _deepspeed(a, check_files: bool, notes: List[str]) -> Tuple[Dict[str, Any], EngineSettings]:
    """The DeepSpeed config (flags, then the user's JSON: its keys win) and the engine it gives. The
    engine rules are checked on the MERGED config: a user JSON that sets the ZeRO stage or offload
    is what runs. Without ``check_files`` a --deepspeed-config not written yet is left out."""

    if a.deepspeed_config and not os.path.isfile(a.deepspeed_config):
        if check_files:
            raise ArgumentsError(f"--deepspeed-config: no such file: {a.deepspeed_config}")
        config = build_deepspeed_config(argparse.Namespace(**{**vars(a), "deepspeed_config": None}))
    else:
        config = build_deepspeed_config(a)
    engine = engine_settings(config, a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                             a.expert_model_parallel_size)
    a.zero_stage = engine.zero_stage
    a.cpu_optimizer = engine.cpu_offload
    a.bf16, a.fp16 = engine.precision == "bf16", engine.precision == "fp16"  # the model's dtype follows
    a.universal_checkpoint = bool(config.get("checkpoint", {}).get("load_universal", False))
    if engine.cpu_offload and engine.zero_stage == 0:
        raise ArgumentsError("--cpu-optimizer needs --zero-stage 1, 2 or 3")
    layout = derivations.layout_engine_problem(engine.pipeline_parallel, engine.expert_parallel, engine.zero_stage,
                                               engine.precision, engine.cpu_offload)
    if layout:
        raise ArgumentsError(layout)
    why_not = fp32_gradient_accumulation(a, engine)
    if a.accumulate_allreduce_grads_in_fp32 and why_not not in (None, "fp32"):
        notes.append(f"--accumulate-allreduce-grads-in-fp32: not applied: {why_not}")
    if a.universal_checkpoint and engine.zero_stage not in (1, 2):
        # Verified: ZeRO 0 fails reading the optimizer state, ZeRO 3 finds no model-states files.
        raise ArgumentsError(f"--universal-checkpoint needs --zero-stage 1 or 2 (DeepSpeed 0.19.8 cannot load a "
                             f"universal checkpoint at ZeRO {engine.zero_stage})")
    return config, engine


def _files(a, check_files: bool, notes: List[str]):
    """The data sources and the tokenizer; the vocabulary sizes the model and checkpoints use. The
    data files are checked against each other, the vocabulary and the splits the run reads."""

    a.vocab_size_unpadded = a.padded_vocab_size = None
    if not check_files:
        return None, None
    sources = data_sources(a)
    tokenizer = tokenizer_for(a, sources)
    if a.vocab_size is not None and a.vocab_size != tokenizer.vocab_size:  # a size no tokenizer has: never ignored
        raise ArgumentsError(f"--vocab-size {a.vocab_size}: the tokenizer ({a.tokenizer_type} {a.tokenizer_model}) has "
                             f"{tokenizer.vocab_size} tokens; give that or leave --vocab-size out")
    if sources:
        notes.extend(check_data_files(a, sources, tokenizer.vocab_size))
    a.vocab_size_unpadded = tokenizer.vocab_size
    a.padded_vocab_size = padded_vocab_size(tokenizer.vocab_size, a.make_vocab_size_divisible_by,
                                            a.tensor_model_parallel_size)
    return sources, tokenizer


def _paths(a) -> None:
    """Folders and files the run will read or write, checked before any work."""

    if a.load:
        check_load_dir(a)
    for flag, path in (("--save", a.save), ("--tensorboard-dir", a.tensorboard_dir)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise ArgumentsError(f"{flag} {path} is a file, not a directory")
    if a.metrics_file and os.path.isdir(a.metrics_file):
        raise ArgumentsError(f"--metrics-file {a.metrics_file} is a directory, not a file")


def _check_plugins(a, engine: EngineSettings) -> Dict[str, Any]:
    """Every family's selected plug-in: its flags, its own checks and the engine it supports."""

    selected = {}
    for family, reg in registry.families().items():
        plugin = reg.selected(a)
        if plugin is not None:
            reg.check(plugin, a, engine)
            selected[family] = plugin
    return selected


def _schedule(a):

    return build_schedule(a)  # the whole curve (and the weight-decay flags) servable before any work starts


def _mc_eval(a, tokenizer, sources, notes):

    check_corpus_eval(a, sources)  # --eval-per-corpus
    return mc_examples_for(a, tokenizer, notes)


def _lr_finder(a) -> None:

    validate_lr_finder_args(a)
