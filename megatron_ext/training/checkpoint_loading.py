"""What ``checkpointing.load_checkpoint`` decides and checks before DeepSpeed loads anything, and
what it fixes up afterwards.

* Which checkpoint: ``latest`` (native) or, with ``--universal-checkpoint``, ``latest_universal``.
  A relaunch of a resized run keeps ``--universal-checkpoint`` on its command line while the run
  has written newer native checkpoints at its new layout into the same directory: the newer native
  one is loaded then (it is the run's own progress).
* Whether it can load: a native checkpoint only at its own tensor-parallel size, and with its
  (ZeRO-partitioned) optimizer state only at its own data-parallel size and ZeRO family (0 vs
  1/2); a model whose tensors do not have the checkpoint's shapes fails with the first mismatching
  tensor and both shapes. All one line (``CheckpointLoadError``), before DeepSpeed's own (long) error.
* After a universal load that should not restore the optimizer (``--no-load-optim``,
  ``--finetune``): DeepSpeed's universal path restores the optimizer state regardless, so it is
  dropped again here (a fresh optimizer with the flags' hyperparameters).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from megatron_ext.checkpoint_layout import (
    LATEST,
    LATEST_UNIVERSAL,
    MODEL_STATES_NAMES,
    CheckpointFileError,
    client_state_file,
    is_universal,
    load_states,
    model_states_files,
    parallel_dimensions,
    rank_experts_name,
    read_latest,
    saved_zero_stage,
    universal_parameters_dir,
    universal_state_file,
)
from megatron_ext.models.features import attention_backend
from megatron_ext.models.parallel import holds_spread_experts
from megatron_ext.models.parallel import splits_model
from megatron_ext.optimizers.common import hooks as optimizer_hooks
from megatron_ext.platform.deepspeed_compat import universal_param_groups_paired_by
from megatron_ext.training.universal import read_record


class CheckpointLoadError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message is one line."""


def _client(load_dir: str, tag: str) -> Dict[str, Any]:
    tag_dir = os.path.join(load_dir, tag)
    if not model_states_files(tag_dir):
        raise CheckpointLoadError(f"--load {load_dir}: checkpoint '{tag}' is missing or incomplete "
                                  f"(no {MODEL_STATES_NAMES} in {tag_dir})")
    try:
        return load_states(client_state_file(tag_dir))
    except CheckpointFileError as e:
        raise CheckpointLoadError(f"--load {load_dir}: {e}") from None


# The dimensions that split the weights: a checkpoint saved at another of these sizes cannot even
# load its weights natively (--no-load-optim does not help; the data-parallel size only moves state).
MODEL_PARALLEL = ("tensor", "pipeline", "expert")


def layout_problem(client: Dict[str, Any], args, load_optim: bool) -> Optional[str]:
    """Why a native checkpoint cannot be loaded at this run's layout (None when it can)."""
    saved = parallel_dimensions(client)
    for size, flag, name in zip(saved, ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                        "expert_model_parallel_size"), MODEL_PARALLEL):
        if size != getattr(args, flag, 1):
            return f"it was saved at {name}-parallel size {size}, this run uses {getattr(args, flag, 1)}"
    stage, saved_stage = args.zero_stage, saved_zero_stage(client) or 0
    dp = args.data_parallel_size
    saved_dp = int(client.get("dp_world_size", dp))
    if (stage == 3) != (saved_stage == 3):  # DeepSpeed reads ZeRO 3's per-DP-rank files only at ZeRO 3
        return f"it was saved with ZeRO {saved_stage}, this run uses ZeRO {stage} (their file layouts differ)"
    if stage == 3 and saved_dp != dp:
        return (f"it was saved at data-parallel size {saved_dp} with ZeRO 3 (weights and optimizer state "
                f"partitioned {saved_dp} ways), this run has data-parallel size {dp}")
    if not load_optim:
        return None  # the weights are whole per TP rank: any data-parallel size and ZeRO stage
    if (stage == 0) != (saved_stage == 0):
        return (f"it was saved with ZeRO {saved_stage}, this run uses ZeRO {stage} "
                "(their optimizer-state formats differ)")
    if stage and saved_dp != dp:
        return (f"it was saved at data-parallel size {saved_dp} with ZeRO {saved_stage} (optimizer state "
                f"partitioned {saved_dp} ways), this run has data-parallel size {dp}")
    return None


def check_load_dir(args) -> None:
    """What ``--load`` must hold before any work starts (the run plan checks it): a directory; with
    ``--universal-checkpoint`` a converted checkpoint; with ``--finetune`` a checkpoint at all (a
    plain ``--load`` of an empty directory starts fresh: one command starts and resumes a run)."""
    if os.path.exists(args.load) and not os.path.isdir(args.load):
        raise CheckpointLoadError(f"--load {args.load} is a file, not a checkpoint directory")
    if getattr(args, "universal_checkpoint", False) and read_latest(args.load, LATEST_UNIVERSAL) is None:
        raise CheckpointLoadError(f"--universal-checkpoint: no '{LATEST_UNIVERSAL}' file in --load {args.load}; "
                                  f"convert a checkpoint first: megatron-ext to-universal {args.load}")
    if getattr(args, "finetune", False) and read_latest(args.load) is None and read_latest(args.load, LATEST_UNIVERSAL) is None:
        raise CheckpointLoadError(f"--finetune: --load {args.load} holds no checkpoint (no '{LATEST}' file); give the "
                                  "directory of the run to start from")


def choose_checkpoint(args, load_optim: bool, say=print) -> Optional[Tuple[str, bool]]:
    """``(tag, is_universal)`` to load from ``args.load``, or None (nothing there yet: a fresh run)."""
    check_load_dir(args)
    native = read_latest(args.load)
    if not getattr(args, "universal_checkpoint", False):
        return (native, False) if native else None
    universal = read_latest(args.load, LATEST_UNIVERSAL)
    u_client = _client(args.load, universal)
    if native and native != universal and os.path.isdir(os.path.join(args.load, native)):
        n_client = _client(args.load, native)
        newer = int(n_client.get("iteration", -1)) > int(u_client.get("iteration", -1))
        if newer and layout_problem(n_client, args, load_optim) is None:
            say(f"--universal-checkpoint: loading {native} (iteration {n_client.get('iteration')}), the run's own "
                f"checkpoint at this layout, newer than the universal {universal} "
                f"(iteration {u_client.get('iteration')})")
            return native, False
    return universal, True


def _full_shape(param, tp: int) -> Tuple[int, ...]:
    """The shape of a (possibly tensor-parallel-sharded) parameter as a whole."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        shape[param.partition_dim] *= tp
    return tuple(shape)


def _mismatch(load_dir: str, tag: str, detail: str) -> CheckpointLoadError:
    return CheckpointLoadError(f"--load {load_dir} ({tag}) does not match the model built from the flags: {detail}")


def _check_parameter_names(client: Dict[str, Any], args, tag: str) -> None:
    """A checkpoint of another attention backend's parameter names (Transformer Engine's) is one line."""
    problem = attention_backend.checkpoint_names_problem(client.get("args") or {}, attention_backend.backend_of(args))
    if problem:
        raise CheckpointLoadError(f"--load {args.load} ({tag}): {problem}")


def check_native(engine, args, tag: str, load_optim: bool) -> None:
    """Layout and tensor shapes of a native checkpoint against this run (raises CheckpointLoadError)."""
    import torch
    from megatron.core import parallel_state as ps

    load_dir = args.load
    client = _client(load_dir, tag)
    if client.get("imported_from") and not args.finetune:  # megatron_ext/hf/checkpoint_writer.py
        raise CheckpointLoadError(f"--load {load_dir} ({tag}) holds weights only (megatron-ext import-hf of "
                                  f"{client['imported_from'].get('source')}): start from it with --finetune")
    _check_parameter_names(client, args, tag)
    problem = layout_problem(client, args, load_optim)
    zero3 = 3 in (args.zero_stage, saved_zero_stage(client))
    if problem and args.zero_stage == 3:
        raise CheckpointLoadError(
            f"--load {load_dir} ({tag}): {problem}; a ZeRO 3 run loads only ZeRO 3 checkpoints of its own layout (to "
            f"change it, convert with 'megatron-ext to-universal {load_dir}' and load that at ZeRO 1 or 2 with "
            "--universal-checkpoint)")
    if problem:
        weights_split = any(f"{name}-parallel size" in problem for name in MODEL_PARALLEL)
        hint = "" if weights_split or zero3 else " (or pass --no-load-optim to load the weights only)"
        raise CheckpointLoadError(
            f"--load {load_dir} ({tag}): {problem}; convert it with 'megatron-ext to-universal {load_dir}' and "
            f"add --universal-checkpoint{hint}")
    tag_dir = os.path.join(load_dir, tag)
    mp_rank = torch.distributed.get_rank(ps.get_model_parallel_group())  # DeepSpeed's mp_rank_XX (training/mpu.py)
    try:
        saved = load_states(client_state_file(tag_dir, mp_rank))
        module = dict(saved.get("module") or {})
        if holds_spread_experts(engine.module):  # this rank's experts are in a file of their own
            module.update(load_states(os.path.join(
                tag_dir, rank_experts_name(ps.get_expert_model_parallel_rank(), mp_rank))))
    except CheckpointFileError as e:
        raise CheckpointLoadError(f"--load {load_dir}: {e}") from None
    # ZeRO 3 keeps empty tensors in the module and in the live model: whole shapes are DeepSpeed's
    # param_shapes in the file, ds_shape on the parameter
    whole = {n: tuple(s) for group in saved.get("param_shapes") or [] for n, s in group.items()} if zero3 else {}
    _compare([(name, whole.get(name, tuple(t.shape))) for name, t in module.items() if hasattr(t, "shape")],
             [(name, tuple(getattr(t, "ds_shape", t.shape))) for name, t in engine.module.state_dict(keep_vars=True).items()
              if hasattr(t, "shape")],
             load_dir, tag, _names_of_every_rank(engine.module))


def check_universal(engine, args, tag: str) -> None:
    """Whole-tensor shapes of a universal checkpoint (``zero/<name>/fp32.pt``) against this model;
    vocabulary tensors are stored unpadded and compared with the tokenizer's vocabulary."""
    from megatron.core import parallel_state as ps

    from deepspeed.checkpoint.constants import PARAM, VOCAB_TENSOR

    tag_dir = os.path.join(args.load, tag)
    zero = universal_parameters_dir(tag_dir)
    if not is_universal(tag_dir):
        raise CheckpointLoadError(f"--load {args.load} ({tag}): not a universal checkpoint (no zero/ folder); "
                                  f"convert with 'megatron-ext to-universal'")
    _check_parameter_names(_client(args.load, tag), args, tag)
    tp = ps.get_tensor_model_parallel_world_size()
    saved, model = [], []
    in_checkpoint = set(os.listdir(zero))
    for name, param in engine.module.named_parameters():
        shape = _full_shape(param, tp)
        path = universal_state_file(tag_dir, name)
        if name in in_checkpoint and os.path.isfile(path):
            stored = load_states(path)
            ckpt_shape = tuple(stored[PARAM].shape)
            if stored.get(VOCAB_TENSOR):  # unpadded rows: compare with the unpadded vocabulary
                shape = (args.vocab_size_unpadded, *shape[1:])
            saved.append((name, ckpt_shape))
        model.append((name, shape))
    # the converter also extracts persistent buffers (an MoE router's expert_bias): not parameters, not extra
    known = {name for name, _ in model} | {name for name, _ in engine.module.named_buffers()}
    # (a link is not a tensor of its own: a tied output layer's folder names the word embedding's)
    saved += [(name, None) for name in sorted(in_checkpoint - known)
              if os.path.isdir(os.path.join(zero, name)) and not os.path.islink(os.path.join(zero, name))]
    _compare(saved, model, args.load, tag, _names_of_every_rank(engine.module))


def _names_of_every_rank(model) -> Optional[set]:
    """The tensor names of the whole model when it is split over ranks (pipeline stages, experts),
    gathered from every rank (one collective); None when every rank holds the whole model."""
    import torch

    if not splits_model():
        return None
    mine = set(model.state_dict().keys())
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return set().union(*gathered)


def _compare(saved: List[Tuple[str, Any]], model: List[Tuple[str, Any]], load_dir: str, tag: str,
             whole_model: Optional[set] = None) -> None:
    """Every tensor of this rank's model in the checkpoint with its shape, and nothing in the
    checkpoint that is not in the model (``whole_model``: every rank's names, when ranks hold parts)."""
    saved_shapes = dict(saved)
    for name, shape in model:
        if name not in saved_shapes:
            raise _mismatch(load_dir, tag, f"{name} (shape {_fmt(shape)} in the model) is not in the checkpoint")
        if saved_shapes[name] != shape:
            raise _mismatch(load_dir, tag, f"first mismatch {name}: shape {_fmt(saved_shapes[name])} in the "
                                           f"checkpoint, {_fmt(shape)} in the model")
    names = whole_model if whole_model is not None else {name for name, _ in model}
    extra = [name for name, _ in saved if name not in names]
    if extra:
        raise _mismatch(load_dir, tag, f"{extra[0]} is in the checkpoint but not in the model")


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")" if shape is not None else "?"


# -- after loading ----------------------------------------------------------------------------
def restore_universal_buffers(engine, load_dir: str, tag: str) -> None:
    """The persistent buffers a universal checkpoint carries (an MoE router's ``expert_bias``):
    the converter extracts them like parameters, DeepSpeed's universal load restores only parameters."""
    import torch

    from deepspeed.checkpoint.constants import PARAM

    for name, buffer in engine.module.named_buffers():
        path = universal_state_file(os.path.join(load_dir, tag), name)
        if os.path.isfile(path):
            with torch.no_grad():
                buffer.copy_(load_states(path)[PARAM].to(buffer.dtype).view_as(buffer))



def optimizer_hyperparameters(engine) -> List[Dict[str, Any]]:
    """The base optimizer's param-group settings (everything but the tensors)."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return [{k: v for k, v in group.items() if k != "params"} for group in base.param_groups]


def discard_optimizer_state(engine, hyperparameters: List[Dict[str, Any]]) -> None:
    """A fresh optimizer after a load that restored one: no state, the flags' hyperparameters."""
    wrapper = engine.optimizer
    base = getattr(wrapper, "optimizer", wrapper)
    base.state.clear()  # torch optimizers create their state lazily at the first step
    for group, settings in zip(base.param_groups, hyperparameters):
        group.update(settings)
    for lp_group in getattr(wrapper, "bit16_groups", []):  # ZeRO's per-parameter views of that state
        for lp in lp_group:
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is not None:
                mapping.optim_fragment = {}


def universal_state_warning(engine, args, tag: str) -> Optional[str]:
    """After a universal load with optimizer state: the optimizer's own warning (hook
    ``universal_checkpoint_loaded``: it re-created what cannot be resharded), else one naming the
    state the conversion did not carry (from its record), else None."""

    warning = optimizer_hooks.universal_checkpoint_loaded(engine.basic_optimizer)
    if warning:
        return warning
    missing = read_record(os.path.join(args.load, tag)).get("not_carried")
    if missing:
        return (f"{args.load} ({tag}) does not carry the optimizer state {', '.join(missing)} (DeepSpeed's "
                f"universal conversion keeps exp_avg, exp_avg_sq and step): --optimizer {args.optimizer} starts "
                "it afresh")
    return None


def universal_groups_by_role(engine):
    """While DeepSpeed loads a universal checkpoint: each param group takes the saved group of its
    role (experts spread over ranks apart), not the one at its position (``deepspeed_compat``); the
    names of its parameters and its index stay this layout's."""

    return universal_param_groups_paired_by(lambda group: (group.get("role"), bool(group.get("moe"))),
                                            local_keys=("param_names", "group_index"))
