"""Checkpoints both ways between Megatron-DeepSpeed (the ALCF fork) and megatron_ext.

The two write DeepSpeed checkpoints of the same tensors under other names, in other containers:
the fork's module state is nested (``language_model.encoder...``), ours flat megatron-core names;
its ZeRO partitions hold two param groups (decay / no decay), ours one per role; the scheduler,
RNG and argument records differ. DeepSpeed's universal format (one folder per parameter with
``fp32``, ``exp_avg``, ``exp_avg_sq``, ``step``) is the neutral ground, so a conversion is:

1. the source checkpoint (ZeRO 1/2, any data- and tensor-parallel size) through DeepSpeed's
   ``ds_to_universal`` (ours through ``megatron-ext to-universal``'s staging, the fork's through
   the same staging with its nested module state set aside and its own
   ``universal_checkpoint_info``), in a hidden staging folder beside the output;
2. every parameter folder renamed (``names.py``);
3. the optimizer's common state (``zero/optimizer_state.pt``) given the param-group layout of the
   trainer that loads it: DeepSpeed's universal load pairs the saved groups with the live ones BY
   POSITION (a count mismatch silently leaves parameters unloaded), so fork -> ours gets one
   group per role in model order, ours -> fork the fork's two groups (``--optimizer-groups roles``
   for a fork run with our matrix optimizers, which keep one group per role). Only the keys that
   describe the layout (and, for the fork, the LR and weight decay of its next iteration) are
   written: the loading run's flags keep their say over betas and epsilons;
4. the client state rewritten into the target's own: iteration, consumed samples and tokens, the
   LR schedule (ours: rebuilt exactly from the fork run's saved arguments; the fork's: its
   ``OptimizerParamScheduler`` fields, plus ours for a fork run with the plug-ins), every
   data-parallel rank's RNG state, the argument record each trainer checks on load;
5. the result renamed into place in one step, then ``latest_universal`` naming it.

The fork's pipeline model (``GPTModelPipe``, its default without ``--no-pipeline-parallel``) names
its parameters by position in its layer list (``3.self_attention...``, ``tied_modules.embed...``)
and keeps the weights in one file per layer and TP rank: a pipeline checkpoint goes through the
same converter (its ZeRO partitions hold every weight; a tied embedding, on the first and the last
stage, is taken from the first), the names through ``names.PipeLayout``, and its layer files are
checked to be all there and readable first. Ours -> fork writes ``GPTModel``'s names, or with
``fork_model="GPTModelPipe"`` the pipeline model's, which the fork then loads at any pipeline size.

Our MoE goes to the fork's DeepSpeed-MoE (router -> gate, experts by index, the experts' own param
group after the fork's two), where DeepSpeed-MoE computes the same model (the MoE feature's
record refuses the rest). The output loads with ``--load DIR --universal-checkpoint`` in either
trainer, at any data-, tensor- and (pipeline model) pipeline-parallel size. Not converted: ZeRO 0
and 3, the fork's DeepSpeed-MoE checkpoints (FORK_MOE_UNTESTED); each is refused in one line
before anything is written.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shlex
import sys
import types
from collections import OrderedDict
from typing import Any, Dict, List, Optional

from megatron_ext.megatron_deepspeed import names, project_api
from megatron_ext.megatron_deepspeed.arguments import our_view
from megatron_ext.megatron_deepspeed.scheduler import STATE_KEY, fork_scheduler_state

FORK, OURS = "Megatron-DeepSpeed", "megatron_ext"
FORK_MODELS = ("GPTModel", "GPTModelPipe")  # the fork's model classes: --no-pipeline-parallel, or its default
# DeepSpeed 0.19.8's MoE save fails on the fork's models (docs/megatron_deepspeed.md, traps): there is no fork
# DeepSpeed-MoE checkpoint to verify a conversion on
FORK_MOE_UNTESTED = ("not converted: with DeepSpeed 0.19.8 the fork cannot save DeepSpeed-MoE checkpoints (its MoE "
                     "save fails on the fork's universal_checkpoint_info), so no conversion of one could be verified")
STAGING_PREFIX = ".convert."
CHECKPOINT_VERSION = 3.0


class ConvertError(ValueError):
    """Bad input for a conversion; the message is one line."""


@dataclasses.dataclass
class Source:
    tag_dir: str
    side: str
    client: Dict[str, Any]
    model_files: List[str]
    pipe: Optional[names.PipeLayout] = None  # the fork's GPTModelPipe (weights in its layer files)
    model_order: List[str] = dataclasses.field(default_factory=list)  # the fork's parameter names, model order

    @property
    def iteration(self) -> int:
        return int(self.client.get("iteration") or 0)


# -- reading the source -------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def side_of(client: Dict[str, Any]) -> Optional[str]:
    args = client.get("args")
    if isinstance(args, dict):
        return OURS
    if args is not None and hasattr(args, "consumed_train_samples"):
        return FORK
    return None


def inspect_source(path: str) -> Source:
    try:
        tag_dir = os.path.join(*project_api.find_checkpoint(path))
    except project_api.CheckpointFileError as e:
        raise ConvertError(str(e)) from None
    models = project_api.model_states_files(tag_dir)
    first = project_api.client_state_file(tag_dir)
    try:
        client = project_api.load_states(first)
    except project_api.CheckpointFileError as e:
        raise ConvertError(str(e)) from None
    side = side_of(client)
    if side is None:
        raise ConvertError(f"{first}: neither a Megatron-DeepSpeed nor a megatron_ext checkpoint (no argument record)")
    if project_api.is_zero3(tag_dir):
        raise ConvertError(f"{tag_dir}: a ZeRO 3 checkpoint; convert one saved with --zero-stage 1 or 2")
    optims = project_api.optim_states_files(tag_dir)
    if not optims:
        raise ConvertError(f"{tag_dir}: saved with ZeRO 0 (no optimizer partitions); DeepSpeed's universal "
                           "conversion needs a --zero-stage 1 or 2 checkpoint")
    if project_api.expert_states_files(tag_dir):
        raise ConvertError(f"{tag_dir}: a DeepSpeed-MoE checkpoint (expert files); {FORK_MOE_UNTESTED}")
    src = Source(tag_dir, side, client, models)
    if side == FORK and isinstance(client.get("module"), dict):
        src.model_order = list(flatten(client["module"]))
    elif side == FORK:
        src.pipe, src.model_order = _pipeline_model(tag_dir, client, models)
    return src


def _pipeline_model(tag_dir: str, client, models: List[str]):
    """(the layout, the parameter names in model order) of a fork GPTModelPipe checkpoint, once every
    layer file its parameters need is there (at each TP rank) and readable."""
    fa = client["args"]
    pipe = names.PipeLayout(int(fa.num_layers), moe=max(_as_list(getattr(fa, "num_experts", [1]))) > 1,
                            tied=not fa.untie_embeddings_and_output_weights)
    tp = int(fa.tensor_model_parallel_size)
    saved = {project_api.layer_of(path): path for path in project_api.layer_states_files(tag_dir)}
    params = [n for path in models for g in _states(path).get("param_shapes") or [] for n in g]
    positions = {int(n.split(".", 1)[0]) for n in params if n[:1].isdigit()}
    if any(n.startswith(names.PIPE_TIED) for n in params):  # the tied module: saved by its first stage only
        positions.add(names.PIPE_EMBEDDING)
    files = {}
    for position in sorted(positions):
        for rank in range(tp):
            path = saved.get((position, rank)) or (saved.get((position, None)) if tp == 1 else None)
            if path is None:
                raise ConvertError(f"{tag_dir}: pipeline layer file {project_api.layer_states_name(position, rank)} "
                                   "missing (the checkpoint is incomplete)")
            files.setdefault(position, path)
    # a layer file's keys are its layer's parameter names (the tied module's under its tie key)
    tied = (names.PIPE_EMBEDDING,) if pipe.tied else ()
    return pipe, [f"{names.PIPE_TIED if position in tied else f'{position}.'}{key}"
                  for position, path in sorted(files.items()) for key in _states(path)]


def _states(path: str):
    try:
        return project_api.load_states(path)
    except project_api.CheckpointFileError as e:
        raise ConvertError(str(e)) from None


def flatten(state, prefix: str = "") -> "OrderedDict[str, Any]":
    """The fork's nested module state -> ``{dotted name: tensor}`` in module order."""
    out: "OrderedDict[str, Any]" = OrderedDict()
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif hasattr(value, "shape"):
            out[name] = value
    return out


# -- the conversion -----------------------------------------------------------------------------


def convert(path: str, load_dir: str, optimizer_groups: Optional[str] = None, workers: int = 1,
            verbose: bool = False, fork_model: Optional[str] = None) -> Dict[str, Any]:
    """Convert the checkpoint at ``path`` (a run directory or a ``global_stepN`` folder) for the
    other trainer, into ``load_dir/<tag>_universal`` (+ ``load_dir/latest_universal``).
    ``fork_model``: ours -> fork, the model class of the fork run that loads it (FORK_MODELS)."""
    src = inspect_source(path)
    load_dir = os.path.abspath(load_dir)
    if os.path.commonpath([load_dir, src.tag_dir]) == src.tag_dir:
        raise ConvertError(f"--output {load_dir} is inside the checkpoint {src.tag_dir}")
    if os.path.exists(load_dir) and not os.path.isdir(load_dir):
        raise ConvertError(f"--output {load_dir}: not a directory")
    if optimizer_groups not in (None, "fork", "roles"):
        raise ConvertError(f"--optimizer-groups {optimizer_groups}: choose fork or roles")
    if optimizer_groups == "fork" and src.side == FORK:
        raise ConvertError("--optimizer-groups fork: the target is megatron_ext, whose optimizers keep one group "
                           "per role")
    if fork_model not in (None, *FORK_MODELS):
        raise ConvertError(f"--fork-model {fork_model}: choose {' or '.join(FORK_MODELS)}")
    if fork_model is not None and src.side == FORK:
        raise ConvertError(f"--fork-model {fork_model}: the target is megatron_ext (the source is the fork's "
                           f"{'GPTModelPipe' if src.pipe else 'GPTModel'})")
    name = project_api.universal_tag_for(os.path.basename(src.tag_dir.rstrip(os.sep)))
    target = os.path.join(load_dir, name)
    if os.path.exists(target):
        raise ConvertError(f"{target} already exists; remove it or choose another --output")
    if src.side != FORK:
        _refuse_ours_to_fork(src, fork_model, optimizer_groups)
    log = sys.stderr if verbose else io.StringIO()
    parameters = len(_param_shapes(src.model_files))  # every stage's
    direction = "Megatron-DeepSpeed -> megatron_ext" if src.side == FORK else "megatron_ext -> Megatron-DeepSpeed"
    with project_api.staged_folder(target, STAGING_PREFIX) as staged_out:

        def converted():  # parameters DeepSpeed's converter has finished (zero/<name>/fp32.pt), bytes written
            zero = os.path.join(staged_out, "zero")
            done = sum(os.path.isfile(os.path.join(zero, p, "fp32.pt")) for p in project_api.universal_parameters(
                staged_out)) if os.path.isdir(zero) else 0
            return done, project_api.folder_bytes(zero)

        with contextlib.redirect_stdout(log), project_api.progress("convert").stage(
                f"{direction}, {parameters} parameters", tensors=parameters, poll=converted):
            if src.side == FORK:
                summary = _fork_to_ours(src, os.path.dirname(staged_out), staged_out, workers, log)
            else:
                summary = _ours_to_fork(src, staged_out, optimizer_groups or "fork", workers, verbose,
                                        fork_model or "GPTModel")
        with open(os.path.join(staged_out, project_api.CONVERSION_RECORD), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    latest = os.path.join(load_dir, project_api.LATEST_UNIVERSAL)
    project_api.write_text_atomically(latest, name)
    summary.update(output=target, latest_universal=latest)
    return summary


# -- fork -> ours --------------------------------------------------------------------------------


def _fork_to_ours(src: Source, staging: str, staged_out: str, workers: int, log) -> Dict[str, Any]:
    torch = _torch()
    from deepspeed.checkpoint import constants as c

    fork_args = src.client["args"]
    if max(_as_list(getattr(fork_args, "num_experts", [1]))) > 1:
        raise ConvertError(f"{src.tag_dir}: a DeepSpeed-MoE run (--num-experts); {FORK_MOE_UNTESTED}")
    shapes = _param_shapes(src.model_files)  # every stage's
    rename = _renames(shapes, to_core=True, pipe=src.pipe)
    staged_in = os.path.join(staging, "in", os.path.basename(src.tag_dir))
    os.makedirs(staged_in)
    record = {"placeholders": set(), "not_carried": set()}
    optims = project_api.optim_states_files(src.tag_dir)
    for entry in sorted(os.listdir(src.tag_dir)):
        source, dest = os.path.join(src.tag_dir, entry), os.path.join(staged_in, entry)
        if not os.path.isfile(source):
            continue
        if source in src.model_files:
            state = project_api.load_states(source)
            state["module"] = None  # nested: DeepSpeed's converter wants flat tensors (all are in zero/ anyway)
            state[c.UNIVERSAL_CHECKPOINT_INFO] = _used_patterns(state.get(c.UNIVERSAL_CHECKPOINT_INFO) or {}, rename)
            torch.save(state, dest)
        elif source in optims:
            project_api.stage_optim_states(source, dest, record)
        else:
            project_api.link_or_copy(source, dest)
    _run_converter(staged_in, staged_out, workers, log)
    project_api.drop_placeholders(staged_out, record)
    _rename_params(staged_out, rename)
    roles = _role_order([rename[n] for n in src.model_order if n in rename], {rename[n]: s for n, s in shapes.items()})
    _set_optimizer_groups(staged_out, lambda _: [{"role": role} for role in roles])

    ours = our_args_from_fork(fork_args, src.client)
    project_api.link_tied_output(staged_out, {"args": ours})  # for our pipeline stages' copy
    schedule, schedule_note = _our_schedule(src.client, fork_args)
    for path in project_api.model_states_files(staged_out):
        state = project_api.load_states(path, mmap=False)  # rewritten in place
        state.update(
            module=None, args=ours, checkpoint_version=CHECKPOINT_VERSION, iteration=src.iteration,
            consumed_samples=int(fork_args.consumed_train_samples), tokens=int(state.get("tokens") or 0),
            lr_scheduler=schedule, rng_state=[_our_rng(s) for s in state.get("rng_state") or []],
        )
        state[c.UNIVERSAL_CHECKPOINT_INFO] = project_api.our_universal_checkpoint_info(types.SimpleNamespace(**ours))
        state[c.PARAM_SHAPES] = [OrderedDict((rename.get(n, n), s) for n, s in g.items())
                                 for g in state.get(c.PARAM_SHAPES) or []]
        torch.save(state, path)
    return _summary(src, FORK, OURS, staged_out, record, len(roles), schedule_note,
                    flags=our_flags(ours))


def our_args_from_fork(fa, client) -> Dict[str, Any]:
    """Our argument record (what our loader and converters read) from the fork run's arguments."""
    from deepspeed.checkpoint import constants as c

    info = client.get(c.UNIVERSAL_CHECKPOINT_INFO) or {}
    rotary = bool(getattr(fa, "use_rotary_position_embeddings", False))
    return {
        "converted_from": FORK,
        "num_layers": fa.num_layers, "hidden_size": fa.hidden_size, "ffn_hidden_size": fa.ffn_hidden_size,
        "num_attention_heads": fa.num_attention_heads,
        "num_key_value_heads": getattr(fa, "num_key_value_heads", None) or fa.num_attention_heads,
        "seq_length": fa.seq_length, "max_position_embeddings": fa.max_position_embeddings,
        "swiglu": bool(fa.swiglu), "untie_embeddings_and_output_weights": bool(fa.untie_embeddings_and_output_weights),
        "add_bias_linear": bool(fa.add_bias_linear),
        "normalization": "RMSNorm" if str(fa.normalization).lower() == "rmsnorm" else "LayerNorm",
        "norm_epsilon": getattr(fa, "layernorm_epsilon", 1e-5),
        "position_embedding_type": "rope" if rotary else "learned_absolute",
        "rope_theta": float(getattr(fa, "rope_theta", 10000)),
        "make_vocab_size_divisible_by": fa.make_vocab_size_divisible_by,
        "vocab_size_unpadded": info.get(c.ORIGINAL_VOCAB_SIZE, fa.padded_vocab_size),
        "padded_vocab_size": fa.padded_vocab_size,
        "tensor_model_parallel_size": fa.tensor_model_parallel_size, "pipeline_model_parallel_size": 1,
        "data_parallel_size": getattr(fa, "data_parallel_size", None), "zero_stage": int(fa.zero_stage),
        "micro_batch_size": fa.micro_batch_size, "global_batch_size": fa.global_batch_size,
        "train_iters": fa.train_iters, "seed": fa.seed, "optimizer": fa.optimizer, "lr": fa.lr, "min_lr": fa.min_lr,
        "lr_decay_style": fa.lr_decay_style, "weight_decay": fa.weight_decay, "clip_grad": fa.clip_grad,
        "bf16": bool(fa.bf16), "fp16": bool(fa.fp16), "tokenizer_type": fa.tokenizer_type,
        "tokenizer_model": getattr(fa, "tokenizer_model", None),
    }


_MODEL_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_key_value_heads",
                "seq_length", "max_position_embeddings", "normalization", "norm_epsilon", "swiglu",
                "position_embedding_type", "rope_theta", "untie_embeddings_and_output_weights", "add_bias_linear",
                "make_vocab_size_divisible_by")


def our_flags(ours: Dict[str, Any]) -> str:
    """Our trainer's model flags for the converted checkpoint's architecture."""
    rope = ours["position_embedding_type"] == "rope"
    return shlex.join(project_api.trainer_flags({k: ours[k] for k in _MODEL_FLAGS if k != "rope_theta" or rope}))


def _our_schedule(client, fork_args):
    """Our LR-schedule state for the fork run: saved by the plug-ins, or rebuilt from the run's
    arguments with our code (the fork does not save its constant / cooldown lengths)."""
    saved = client.get("lr_scheduler")
    if isinstance(saved, dict) and STATE_KEY in saved:
        return {k: v for k, v in saved[STATE_KEY].items() if k != "position"}, "as the plug-ins saved it"
    view = argparse.Namespace(**{**project_api.our_flag_defaults(), **_schedule_fields(fork_args)})
    try:
        return project_api.schedule_states(our_view(view)), "rebuilt from the run's arguments"
    except (ValueError, KeyError) as e:
        raise ConvertError(f"the run's LR schedule ({fork_args.lr_decay_style}) cannot be expressed as megatron_ext's: "
                           f"{str(e).splitlines()[0]}") from None


_SCHEDULE_FIELDS = ("lr", "min_lr", "lr_decay_style", "lr_decay_iters", "lr_decay_samples", "lr_decay_tokens",
                    "lr_warmup_fraction", "lr_warmup_iters", "lr_warmup_samples", "lr_warmup_tokens", "train_iters",
                    "train_samples", "global_batch_size", "micro_batch_size", "seq_length", "weight_decay",
                    "weight_decay_incr_style", "start_weight_decay", "end_weight_decay", "world_size",
                    "tensor_model_parallel_size", "pipeline_model_parallel_size")
_STYLE_FIELDS = {"constant": ("lr_constant_plus_cooldown", "lr_constant_plus_cooldown_frac"),
                 "infinite-cosine": ("constant_lr", "lr_cooldown_fraction", "lr_constant_fraction"),
                 "infinite-inv-square-root": ("constant_lr", "lr_cooldown_fraction", "lr_constant_fraction",
                                              "timescale")}


def _schedule_fields(fa) -> Dict[str, Any]:
    fields = {k: getattr(fa, k) for k in _SCHEDULE_FIELDS if hasattr(fa, k)}
    style = str(getattr(fa, "lr_decay_style", ""))
    fields.update({k: getattr(fa, k) for k in _STYLE_FIELDS.get(style, ()) if hasattr(fa, k)})
    if style == "constant" and not getattr(fa, "lr_constant_plus_cooldown", False):
        fields.pop("lr_constant_plus_cooldown_frac", None)
    return fields


def _param_shapes(model_files: List[str]) -> "OrderedDict[str, Any]":
    """Every parameter's (TP shard) shape, from the model-states files of every stage."""
    from deepspeed.checkpoint import constants as c

    return OrderedDict((n, s) for path in model_files for g in _states(path).get(c.PARAM_SHAPES) or []
                       for n, s in g.items())


def _our_rng(fork_state: Dict[str, Any]) -> Dict[str, Any]:
    return {"random": fork_state["random_rng_state"], "numpy": fork_state["np_rng_state"],
            "torch": fork_state["torch_rng_state"], "accelerator": fork_state.get("cuda_rng_state"),
            "tensor_parallel": dict(fork_state.get("rng_tracker_states") or {})}


# -- ours -> fork --------------------------------------------------------------------------------


def _refuse_ours_to_fork(src: Source, fork_model: Optional[str] = None, groups: Optional[str] = None) -> None:
    """What of our models the fork has no counterpart for: one line before anything is written."""
    oa = src.client["args"]
    problem = project_api.model_feature_refusal(oa)  # (the records of megatron_ext/models/features)
    if problem:
        raise ConvertError(f"{src.tag_dir}: {problem}")
    if oa.get("position_embedding_type") not in ("rope", "learned_absolute"):
        raise ConvertError(f"{src.tag_dir}: position embeddings {oa.get('position_embedding_type')} unknown to the fork")
    if (oa.get("num_experts") or 1) > 1 and (fork_model == "GPTModelPipe" or groups == "roles"):
        raise ConvertError(f"{src.tag_dir}: an MoE model converts for the fork's GPTModel with its own optimizer "
                           f"groups only (--fork-model GPTModelPipe / --optimizer-groups roles with DeepSpeed-MoE: not "
                           "verified)")


def _ours_to_fork(src: Source, staged_out: str, groups: str, workers: int, verbose: bool,
                  fork_model: str) -> Dict[str, Any]:
    torch = _torch()
    from deepspeed.checkpoint import constants as c

    oa = src.client["args"]
    try:
        converted = project_api.to_universal(src.tag_dir, staged_out, workers=workers, verbose=verbose)
    except project_api.ConversionError as e:
        raise ConvertError(str(e)) from None
    zero = project_api.universal_parameters_dir(staged_out)
    for entry in os.listdir(zero):  # a tied output layer's link to the embedding: the fork ties by itself
        if os.path.islink(os.path.join(zero, entry)):
            os.unlink(os.path.join(zero, entry))
    pipe = names.PipeLayout(int(oa["num_layers"]), tied=not oa.get("untie_embeddings_and_output_weights", True)) \
        if fork_model == "GPTModelPipe" else None
    rename = _renames(project_api.universal_parameters(staged_out), to_core=False, pipe=pipe)
    experts = (oa.get("num_experts") or 1) > 1
    _rename_params(staged_out, rename)

    consumed = int(src.client["consumed_samples"])
    schedule = dict(src.client["lr_scheduler"])
    lr_schedule = project_api.lr_schedule_from_state(schedule["schedule"])
    next_lr = lr_schedule.lr(float(consumed))
    next_wd = project_api.weight_decay_at(schedule["weight_decay"], float(consumed))

    def layout_of(ours_groups):
        if groups == "roles":
            return [{"role": g["role"], "lr": next_lr * g.get("lr_mult", 1.0),
                     "weight_decay": next_wd * g.get("wd_mult", 1.0)} for g in ours_groups]
        return _fork_groups(ours_groups, next_lr, next_wd, experts=experts)

    layout = _set_optimizer_groups(staged_out, layout_of)

    fork_args = fork_args_from_ours(oa, src.client)
    fork_schedule = fork_scheduler_state(schedule, consumed, src.client.get("tokens"))
    for path in project_api.model_states_files(staged_out):
        state = project_api.load_states(path, mmap=False)  # rewritten in place
        state.pop("consumed_samples", None)
        state.update(module=None, args=fork_args, checkpoint_version=CHECKPOINT_VERSION, iteration=src.iteration,
                     tokens=int(src.client.get("tokens") or 0), lr_scheduler=fork_schedule,
                     rng_state=[_fork_rng(s) for s in (state.get("rng_state") or [])[:1]])
        state[c.UNIVERSAL_CHECKPOINT_INFO] = fork_universal_info(fork_args, state.get(c.UNIVERSAL_CHECKPOINT_INFO) or {},
                                                                 pipe is not None)
        state[c.PARAM_SHAPES] = [OrderedDict((rename.get(n, n), s) for n, s in g.items())
                                 for g in state.get(c.PARAM_SHAPES) or []]
        torch.save(state, path)
    notes = []
    style = schedule["schedule"]["style"]
    if style not in FORK_STYLES:
        notes.append(f"the fork's own scheduler has no --lr-decay-style {style}: continue it with "
                     "MEGATRON_EXT_PLUGINS=all")
    if experts:
        topk = oa.get("moe_router_topk") or 2
        notes.append(f"DeepSpeed-MoE: continue it with --num-experts {oa['num_experts']} --topk {topk} --expert-interval 1 "
                     "--moe-expert-parallel-size 1 --create-moe-param-group --disable-moe-token-dropping"
                     f"{' --disable-moe-top2-2nd-expert-sampling' if topk == 2 else ''} (as ours computes it: no "
                     "capacity, no random second expert); at expert parallel 1, as DeepSpeed 0.19.8's universal load "
                     "gives each rank's experts by their local index (at EP > 1 every rank would load experts 0..)")
    summary = _summary(src, OURS, FORK, staged_out, {"placeholders": set(), "not_carried": set(converted["not_carried"])},
                       len(layout), "the fork's fields, and megatron_ext's for the plug-ins")
    summary["notes"] = notes
    summary["group_layout"] = groups
    summary["fork_model"] = fork_model
    return summary


FORK_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "infinite-cosine", "infinite-inv-square-root")


def _fork_groups(ours_groups, next_lr: float, next_wd: float, experts: bool = False) -> List[Dict[str, Any]]:
    """The fork's two groups (decay, then no decay) for the fork's own optimizers; with ``experts``, the
    group DeepSpeed splits the experts' matrices into after them (``--create-moe-param-group``: a copy of
    the decay group, named after the expert-parallel size, 1: see the notes)."""
    for g in ours_groups:
        if g.get("lr_mult", 1.0) != 1.0 or (g.get("wd_mult", 1.0) not in (0.0, 1.0)):
            raise ConvertError(f"the checkpoint's param group '{g.get('role')}' has LR / weight-decay multipliers "
                               f"(lr x{g.get('lr_mult', 1.0):g}: muP/CompleteP or a matrix optimizer), which the fork's "
                               "two groups cannot hold: convert with --optimizer-groups roles and continue with "
                               "MEGATRON_EXT_PLUGINS=all and the same flags")
    layout = []
    if any(g.get("wd_mult", 1.0) > 0 for g in ours_groups):
        layout.append({"name": "wd_no_scale_lr", "wd_mult": 1.0, "lr_mult": 1.0, "lr": next_lr, "weight_decay": next_wd})
    if any(g.get("wd_mult", 1.0) == 0 for g in ours_groups):
        layout.append({"name": "no_wd_no_scale_lr", "wd_mult": 0.0, "lr_mult": 1.0, "lr": next_lr, "weight_decay": 0.0})
    if experts:
        layout.append({"name": "ep_size_1", "moe": True, "wd_mult": 1.0, "lr_mult": 1.0, "lr": next_lr,
                       "weight_decay": next_wd})
    return layout


def fork_args_from_ours(oa: Dict[str, Any], client: Dict[str, Any]) -> argparse.Namespace:
    """The argument record the fork's loader reads (``check_checkpoint_args``, consumed samples)."""
    rope = oa.get("position_embedding_type") == "rope"
    fields = dict(
        num_layers=oa["num_layers"], hidden_size=oa["hidden_size"], ffn_hidden_size=oa["ffn_hidden_size"],
        num_attention_heads=oa["num_attention_heads"],
        num_key_value_heads=oa.get("num_key_value_heads") or oa["num_attention_heads"],
        seq_length=oa["seq_length"], max_position_embeddings=oa.get("max_position_embeddings") or oa["seq_length"],
        add_position_embedding=not rope, use_rotary_position_embeddings=rope, rope_theta=oa.get("rope_theta"),
        swiglu=bool(oa.get("swiglu")), untie_embeddings_and_output_weights=bool(oa.get("untie_embeddings_and_output_weights")),
        add_bias_linear=bool(oa.get("add_bias_linear")),
        normalization="rmsnorm" if str(oa.get("normalization")).lower() == "rmsnorm" else "layernorm",
        layernorm_epsilon=oa.get("norm_epsilon", 1e-5),
        make_vocab_size_divisible_by=oa.get("make_vocab_size_divisible_by"), padded_vocab_size=oa.get("padded_vocab_size"),
        tokenizer_type=oa.get("tokenizer_type"), tensor_model_parallel_size=oa.get("tensor_model_parallel_size", 1),
        pipeline_model_parallel_size=1, data_parallel_random_init=False, zero_stage=oa.get("zero_stage"),
        micro_batch_size=oa.get("micro_batch_size"), global_batch_size=oa.get("global_batch_size"),
        train_iters=oa.get("train_iters"), seed=oa.get("seed"), lr=oa.get("lr"), min_lr=oa.get("min_lr"),
        lr_decay_style=oa.get("lr_decay_style"), optimizer=oa.get("optimizer"), weight_decay=oa.get("weight_decay"),
        consumed_train_samples=int(client["consumed_samples"]), consumed_valid_samples=0,
        consumed_train_tokens=int(client.get("tokens") or 0), iteration=int(client["iteration"]),
        num_experts=[oa.get("num_experts") or 1], topk=oa.get("moe_router_topk") or 1, converted_from=OURS,
    )
    return argparse.Namespace(**fields)


def fork_universal_info(fa: argparse.Namespace, ours_info: Dict[str, Any], pipeline: bool = False) -> Dict[str, Any]:
    """``universal_checkpoint_info`` as the fork's GPTModel (``pipeline``: GPTModelPipe) writes it
    (for a later re-conversion)."""
    from deepspeed.checkpoint import constants as c

    untied = fa.untie_embeddings_and_output_weights
    if pipeline:
        layers, final_norm = r"\d+.", r"\d+.weight"
        vocabulary = [r"\d+.word_embeddings.weight", r"\d+.lm_head.weight"] if untied \
            else [names.PIPE_TIED + "word_embeddings.weight"]
    else:
        layers, final_norm = r"language_model.encoder.layers.\d+.", "language_model.encoder.final_layernorm.weight"
        vocabulary = ["language_model.embedding.word_embeddings.weight"] + (["language_model.output_layer.weight"]
                                                                            if untied else [])
    info = {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            c.ORIGINAL_VOCAB_SIZE: ours_info.get(c.ORIGINAL_VOCAB_SIZE, fa.padded_vocab_size),
            c.PADDED_VOCAB_SIZE: fa.padded_vocab_size, c.VOCABULARY_PARAMETER_PATTERNS: vocabulary}
    if pipeline:
        info[c.PIPELINE_REPLICATED_PARAMETER_PATTERNS] = [] if untied else list(vocabulary)
    if fa.tensor_model_parallel_size > 1:
        info[c.TP_REPLICATED_PARAMETER_PATTERNS] = [layers + "input_layernorm.weight", layers + "post_attention_layernorm.weight",
                                                    final_norm]
        info[c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] = [layers + "mlp.dense_4h_to_h.weight", layers + "self_attention.dense.weight"]
    if fa.swiglu:
        info[c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0] = [layers + "mlp.dense_h_to_4h.weight"]
    return info


def _fork_rng(ours: Dict[str, Any]) -> Dict[str, Any]:
    return {"random_rng_state": ours["random"], "np_rng_state": ours["numpy"], "torch_rng_state": ours["torch"],
            "cuda_rng_state": ours.get("accelerator") if ours.get("accelerator") is not None else ours["torch"],
            "rng_tracker_states": dict(ours.get("tensor_parallel") or {})}


# -- shared steps --------------------------------------------------------------------------------


def _as_list(value):
    return value if isinstance(value, (list, tuple)) else [value]


def _renames(param_names, to_core: bool, pipe: Optional[names.PipeLayout] = None) -> Dict[str, str]:
    try:
        return names.rename_map(param_names, to_core=to_core, pipe=pipe)
    except names.UnknownParameterError as e:
        raise ConvertError(str(e)) from None


def _used_patterns(info: Dict[str, Any], rename: Dict[str, str]) -> Dict[str, Any]:
    """The fork's own ``universal_checkpoint_info``, each pattern list kept to the patterns that
    match a parameter (DeepSpeed's converter rejects patterns that match nothing)."""
    import re

    from deepspeed.checkpoint import constants as c

    info = dict(info)
    info.setdefault(c.UNIVERSAL_CHECKPOINT_VERSION_KEY, c.UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    for key, value in list(info.items()):
        if key.endswith("_patterns") or key == c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0:
            info[key] = [p for p in value if any(re.match(p, n) for n in rename)]
    return info


def _run_converter(staged_in: str, staged_out: str, workers: int, log) -> None:
    try:
        project_api.run_converter(staged_in, staged_out, project_api.ConverterOptions(extract_workers=workers), log)
    except Exception as e:  # noqa: BLE001 - DeepSpeed's own failure, reported in one line
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConvertError(f"DeepSpeed's ds_to_universal failed: {type(e).__name__}: {detail} "
                           "(run again with --verbose for its output)") from None


def _rename_params(out: str, rename: Dict[str, str]) -> None:
    zero = project_api.universal_parameters_dir(out)
    for old in project_api.universal_parameters(out):
        if old not in rename:
            raise ConvertError(f"universal checkpoint folder zero/{old}: not a parameter we can rename")
        os.rename(os.path.join(zero, old), os.path.join(zero, "." + rename[old]))
    for tmp in os.listdir(zero):
        if tmp.startswith("."):
            os.rename(os.path.join(zero, tmp), os.path.join(zero, tmp[1:]))


def _role_order(core_names_in_model_order: List[str], shapes: Dict[str, Any]) -> List[str]:
    """Our trainer's param groups, in its order: one per role, by first appearance in the model
    (``shapes``: of every parameter, by its megatron-core name)."""
    torch = _torch()
    roles: List[str] = []
    for core in core_names_in_model_order:
        role = project_api.param_role(core, torch.empty(tuple(shapes[core]), device="meta"))
        if role not in roles:
            roles.append(role)
    return roles


def _set_optimizer_groups(out: str, layout_of) -> List[Dict[str, Any]]:
    """The param groups of ``zero/optimizer_state.pt`` become ``layout_of(its saved groups)``
    (DeepSpeed pairs them with the loading optimizer's groups by position and copies these keys
    into them); returns that layout."""
    torch = _torch()
    path = project_api.universal_optimizer_state_file(out)
    state = project_api.load_states(path, mmap=False)  # rewritten in place
    layout = layout_of(state["param_groups"])
    state["param_groups"] = [{**g, "params": [i]} for i, g in enumerate(layout)]
    for key in ("group_paddings", "partition_count"):
        if key in state:
            state[key] = [0] * len(layout) if key == "group_paddings" else [state[key][0]] * len(layout)
    state.pop("param_alignment_paddings", None)
    torch.save(state, path)
    return layout


def _summary(src: Source, source: str, target: str, out: str, record, groups: int, schedule: str,
             flags: str = "") -> Dict[str, Any]:
    params, carried = project_api.converted_listing(out)
    client = src.client
    tp, pp, _ = project_api.parallel_dimensions(client) if source == OURS else \
        (client["args"].tensor_model_parallel_size, client["args"].pipeline_model_parallel_size, 1)
    return {"source": src.tag_dir, "from": source, "to": target, "iteration": src.iteration,
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "model": "GPTModelPipe" if src.pipe else "GPTModel" if source == FORK else "GPTModel (megatron-core)",
            "data_parallel_size": client.get("dp_world_size"),
            "parameters": len(params), "carried": carried, "not_carried": sorted(record["not_carried"]),
            "optimizer_groups": groups, "schedule": schedule, "model_flags": flags}


def describe(s: Dict[str, Any]) -> str:
    load_dir = os.path.dirname(s["output"])
    lines = [f"converted {s['from']} checkpoint {s['source']} ({s['model']}, iteration {s['iteration']}, "
             f"TP={s['tensor_model_parallel_size']}, PP={s['pipeline_model_parallel_size']}, DP={s['data_parallel_size']}) "
             f"for {s['to']}{' ' + s['fork_model'] if s.get('fork_model') else ''}",
             f"wrote {s['output']}: {s['parameters']} parameters (fp32 weights; optimizer state "
             f"{', '.join(k for k in s['carried'] if k != 'fp32') or 'none'}; {s['optimizer_groups']} optimizer groups"
             f"{' in the fork layout' if s.get('group_layout') == 'fork' else ''}), "
             f"iteration, consumed samples, LR schedule ({s['schedule']}), RNG",
             f"wrote {s['latest_universal']} -> {os.path.basename(s['output'])}"]
    if s.get("not_carried"):
        lines.append(f"not carried (the optimizer re-creates them on load): {', '.join(s['not_carried'])}")
    for note in s.get("notes") or []:
        lines.append(f"note: {note}")
    if s["to"] == OURS:
        lines.append(f"continue with: python -m megatron_ext.train --load {load_dir} --universal-checkpoint "
                     f"{s['model_flags']} [the run's other flags]   (add --finetune for weights only)")
    else:
        model = ("at any --pipeline-model-parallel-size, without --no-pipeline-parallel"
                 if s.get("fork_model") == "GPTModelPipe" else "with --no-pipeline-parallel")
        lines.append(f"continue in the fork's checkout with: --load {load_dir} --universal-checkpoint "
                     f"[the run's flags, {model}]   (add --finetune for weights only)")
    return "\n".join(lines)
