"""DeepSpeed checkpoints with the client state Megatron-DeepSpeed writes (and universal
conversion needs): iteration, consumed samples/tokens, args, RNG state of every data-parallel
rank, the LR schedule, and ``universal_checkpoint_info``. Megatron's
``latest_checkpointed_iteration.txt`` is written beside DeepSpeed's ``latest``."""
from __future__ import annotations

import contextlib
import os
import random
import shutil
from typing import Any, Dict, List

import numpy as np
import torch

from megatron_ext.checkpoint_layout import (LATEST, TRACKER_FILE, own_checkpoints, parallel_dimensions,
                                            rank_experts_name, read_latest, tag_for)
from megatron_ext.fileio import DISCARD_PREFIX, TMP_PREFIX, discard_folder, publish_folder, write_text_atomically
from megatron_ext.training.universal import universal_checkpoint_info
from megatron_ext.checkpoint_layout import load_states
from megatron_ext.models.parallel import holds_spread_experts
from megatron_ext.models.parallel import is_expert_parameter
from megatron_ext.platform.accelerator import _accel, has_gpu
from megatron_ext.schedules.common.scheduler import LRSchedule, ScheduleResumeError
from megatron_ext.training import checkpoint_loading as loading
from megatron_ext.training.metrics import print_rank0

CHECKPOINT_VERSION = 3.0


def rng_state() -> Dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        # megatron-core's per-TP-rank streams (dropout inside tensor-parallel regions)
        "tensor_parallel": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    if has_gpu():
        state["accelerator"] = _accel().get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any], tensor_parallel: bool = True) -> None:
    """``tensor_parallel=False`` keeps the freshly seeded tensor-parallel streams (after a TP size
    change a saved stream belongs to another TP rank: ranks would share dropout masks)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if has_gpu() and "accelerator" in state:
        _accel().set_rng_state(state["accelerator"])
    if tensor_parallel and state.get("tensor_parallel"):
        get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tensor_parallel"].items()})


def _gather_rng_states():
    """RNG state of every data-parallel rank (DeepSpeed writes client state from DP rank 0 only)."""
    from megatron.core import parallel_state as ps

    states = [None] * ps.get_data_parallel_world_size()
    torch.distributed.all_gather_object(states, rng_state(), group=ps.get_data_parallel_group())
    return states


def save_checkpoint(engine, args, iteration: int, consumed_samples: int, scheduler) -> str:
    """Write ``<save>/global_step<iteration>`` crash-safely; returns the tag directory.

    Every rank writes its files into a hidden staging tag (``.incomplete.global_stepN``). Once all
    of them are done, rank 0 renames the complete directory into place, then replaces ``latest``
    and ``latest_checkpointed_iteration.txt`` (each a complete temporary file ``os.replace``d), and
    only then prunes old checkpoints (``--keep-last``). A kill at any moment therefore leaves
    ``latest`` naming a complete checkpoint: the new one or the previous one."""
    client_state = {
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "tokens": consumed_samples * args.seq_length,
        "lr_scheduler": scheduler.state_dict(),
    }
    if engine.has_moe_layers:
        # (expert parallelism: DeepSpeed's MoE save writes the module's attribute itself and refuses
        # the key in the client state)
        engine.module.universal_checkpoint_info = universal_checkpoint_info(args)
    else:
        client_state["universal_checkpoint_info"] = universal_checkpoint_info(args)
    rng = _gather_rng_states()
    if not args.no_save_rng:
        client_state["rng_state"] = rng
    if engine.checkpoint_engine.is_decoupled():  # files still being written when its save returns
        raise RuntimeError("crash-safe saves need DeepSpeed's synchronous checkpoint engine: remove the "
                           "asynchronous (decoupled/datastates) checkpoint engine from --deepspeed-config")
    tag = tag_for(iteration)
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        os.makedirs(args.save, exist_ok=True)
        discard_leftovers(args.save)  # of a save that was killed; never read, only in the way
    torch.distributed.barrier()
    # save_latest=False: DeepSpeed would write `latest` in place, before our rename.
    engine.save_checkpoint(args.save, tag=TMP_PREFIX + tag, client_state=client_state, save_latest=False)
    # DeepSpeed's save ends with a barrier: every rank's files are in the staging directory.
    if save_rank_experts(engine.module, os.path.join(args.save, TMP_PREFIX + tag)):
        torch.distributed.barrier()
    if rank0:
        publish_checkpoint(args.save, TMP_PREFIX + tag, tag, iteration)
        if args.keep_last:
            prune_checkpoints(args.save, args.keep_last)
    torch.distributed.barrier()
    return os.path.join(args.save, tag)


def save_rank_experts(model, tag_dir: str) -> bool:
    """Expert parallelism: DeepSpeed writes the module from data-parallel rank 0 only, which holds
    expert-parallel rank 0's experts; each expert-parallel rank's experts are written here (by its
    first expert-data-parallel rank, per pipeline stage). Returns whether the layout has them."""
    from megatron.core import parallel_state as ps

    from megatron_ext.training.mpu import MegatronCoreMPU  # megatron-core, as above: only in a run

    if ps.get_expert_model_parallel_world_size() == 1:
        return False
    experts = {name: p.detach().clone() for name, p in model.named_parameters() if is_expert_parameter(p)}
    if experts and ps.get_expert_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0:
        name = rank_experts_name(ps.get_expert_model_parallel_rank(), MegatronCoreMPU.get_model_parallel_rank())
        torch.save(experts, os.path.join(tag_dir, name))
    return True


def load_rank_experts(model, tag_dir: str) -> None:
    """This expert-parallel rank's experts (``save_rank_experts``), after DeepSpeed loaded the module."""
    from megatron.core import parallel_state as ps

    from megatron_ext.training.mpu import MegatronCoreMPU  # megatron-core, as above: only in a run

    name = rank_experts_name(ps.get_expert_model_parallel_rank(), MegatronCoreMPU.get_model_parallel_rank())
    experts = load_states(os.path.join(tag_dir, name))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in experts.items():
            params[key].copy_(tensor)


def publish_checkpoint(save_dir: str, staging: str, tag: str, iteration: int) -> None:
    """Make the complete staging directory ``tag`` (``fileio.publish_folder``: synced, one rename,
    an older save of the same iteration swapped out) and point ``latest`` (then Megatron's tracker
    file) at it. Each step is one rename, so ``latest`` always names a complete checkpoint."""
    publish_folder(os.path.join(save_dir, staging), os.path.join(save_dir, tag))
    write_text_atomically(os.path.join(save_dir, LATEST), tag)
    write_text_atomically(os.path.join(save_dir, TRACKER_FILE), str(iteration))


def discard_leftovers(save_dir: str) -> None:
    """Delete what killed saves left behind: staging directories, temporary files, half-deleted
    checkpoints (all hidden names that loading never reads)."""
    for name in os.listdir(save_dir):
        if not name.startswith((TMP_PREFIX, DISCARD_PREFIX)):
            continue
        path = os.path.join(save_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def prune_checkpoints(save_dir: str, keep: int) -> List[str]:
    """Delete all but ``keep`` checkpoints: the one ``latest`` names and the highest iterations
    among the rest. Returns the names deleted."""
    latest = read_latest(save_dir)
    others = [name for _, name in own_checkpoints(save_dir) if name != latest]
    kept = keep - 1 if latest is not None else keep
    doomed = others[:max(len(others) - kept, 0)]
    for name in doomed:
        discard_folder(os.path.join(save_dir, name))
    return doomed


def _continual_pretraining_note(client: Dict[str, Any], args) -> str:
    """``--finetune`` (continual pretraining): the LR the checkpoint was at against the max LR this
    run warms up to; a checkpoint that had already cooled down is pointed out (the ALCF guide's
    advice: continue from a checkpoint taken at the max LR, before the cooldown)."""

    state = client.get("lr_scheduler") or {}
    try:
        schedule = LRSchedule.from_state(state["schedule"])
    except (KeyError, TypeError, ScheduleResumeError):
        return ""
    position = float(client.get("consumed_samples") or 0)
    lr, peak = schedule.lr(position), schedule.span.max_lr
    line = (f"continual pretraining from iteration {client.get('iteration')}: the checkpoint's LR there was "
            f"{lr:.4g} (its max {peak:.4g}); this run warms up to --lr {args.lr:g}")
    if peak > 0 and lr < 0.5 * peak:
        line += (f"\nnote: that checkpoint had cooled down to {lr / peak:.0%} of its max LR; continual pretraining "
                 "usually starts from a checkpoint taken at the max LR, before the cooldown")
    return line


def load_checkpoint(engine, args, scheduler) -> Dict[str, Any]:
    """Resume from ``args.load``. Returns ``{"iteration", "consumed_samples", "path"}`` (zeros and
    path None when there is nothing to load yet, so the same command starts or resumes a run)."""
    from megatron.core import parallel_state as ps

    start = {"iteration": 0, "consumed_samples": 0, "path": None}
    load_optim = not (args.no_load_optim or args.finetune)
    chosen = loading.choose_checkpoint(args, load_optim, say=print_rank0)
    if chosen is None:
        return start
    tag, universal = chosen
    if universal:
        loading.check_universal(engine, args, tag)
    else:
        loading.check_native(engine, args, tag, load_optim)
    engine._config.load_universal_checkpoint = universal  # the run's own newer native checkpoint may win
    fresh_optimizer = loading.optimizer_hyperparameters(engine)
    # Expert parallelism: DeepSpeed's module file (native) holds expert-parallel rank 0's experts; this
    # rank's come from its own file (checked to be there: checkpoint_loading.check_native). A universal
    # load takes every weight from the zero/ folders.
    split_experts = ps.get_expert_model_parallel_world_size() > 1
    with loading.universal_groups_by_role(engine) if universal else contextlib.nullcontext():
        path, client = engine.load_checkpoint(
            args.load,
            tag=tag,
            load_optimizer_states=load_optim,
            load_lr_scheduler_states=False,
            load_module_only=args.finetune,
            load_module_strict=not split_experts,
        )
    if path is None:
        raise RuntimeError(f"--load {args.load}: could not load checkpoint '{tag}'")
    start["path"] = os.path.dirname(path)  # DeepSpeed returns the model-states file inside the tag
    if split_experts and not universal and holds_spread_experts(engine.module):
        load_rank_experts(engine.module, start["path"])
    if universal:
        loading.restore_universal_buffers(engine, args.load, tag)
    if universal and not load_optim:  # DeepSpeed's universal path restores the optimizer regardless
        loading.discard_optimizer_state(engine, fresh_optimizer)
    elif universal:
        warning = loading.universal_state_warning(engine, args, tag)
        if warning:
            print_rank0(f"warning: {warning}")
    if args.finetune:
        note = _continual_pretraining_note(client, args)
        if note:
            print_rank0(note)
        return start
    start["iteration"] = client["iteration"]
    start["consumed_samples"] = client["consumed_samples"]
    scheduler.load_state_dict({**client["lr_scheduler"], "position": start["consumed_samples"]})
    states = client.get("rng_state")
    if states and not args.no_load_rng:
        # One state per data-parallel rank of the saving run (all equal: every rank is seeded alike
        # and draws alike). At another DP size a rank beyond the saved ones takes rank 0's.
        dp_rank = ps.get_data_parallel_rank()
        same_tp = parallel_dimensions(client)[0] == ps.get_tensor_model_parallel_world_size()
        set_rng_state(states[dp_rank] if dp_rank < len(states) else states[0], tensor_parallel=same_tp)
    return start
