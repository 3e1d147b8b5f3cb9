"""Where DeepSpeed 0.19.8 needs help; each patch only for the DeepSpeed version read (another
version keeps its own code). With cpu_compat, the only modules that patch third-party code.

* Clipping without host syncs: ZeRO 1/2's step tests, once per param group, whether the global
  gradient norm is finite before clipping (``DeepSpeedZeroOptimizer.unscale_and_clip_grads``), with
  a Python ``bool`` of a device tensor: one host synchronisation per param group per step. The same
  computation decided on the device (an invalid norm clips as an infinite one, as DeepSpeed does).
  The overflow check that skips a step with inf/NaN gradients (fp16, and bf16 unless
  ``"bf16": {"check_grad_overflow": false}``) is a host decision and stays.
* The ZeRO 1/2 norm across pipeline stages: ``scaled_global_norm`` all-reduces over the
  model-parallel group (tensor x pipeline) once per param group. Stages hold different param
  groups (the first has the embedding's, the last the final norm's and output's; DeepSpeed drops
  empty groups, so they cannot be padded) and call that collective a different number of times:
  the ranks hang. Each group's norm is still reduced over its data-parallel group; the stage's
  squared total is all-reduced over the model-parallel group once.
* Universal checkpoints of layouts whose ranks hold different param groups (pipeline stages,
  expert-parallel ranks): DeepSpeed's universal load pairs the optimizer's param groups with the
  saved ones by position (``zip`` in ``load_hp_checkpoint_state_from_checkpoint_dir``), so a group
  past the saved count is never loaded and the others take another group's hyperparameters (and
  per-layout keys). ``universal_param_groups_paired_by`` pairs them by a key instead, for the
  duration of a load.
* Expert parallelism with megatron-core's MoE (``adopt_expert_groups``): DeepSpeed reduces expert
  gradients over the expert-data-parallel group, and partitions expert param groups over it, only
  when its engine decides at construction that the model has DeepSpeed MoE layers
  (``isinstance(module, deepspeed.moe.layer.MoE)``), and it looks the groups up by name in its own
  registry (``deepspeed.utils.groups``). Without that, ``deepspeed.initialize`` fails broadcasting
  the model (``'Parameter' object has no attribute 'group_name'``), or expert gradients would be
  averaged across ranks holding different experts.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Callable, Hashable, Iterable

import torch
from megatron_ext.platform.cpu_compat import torch_with

PATCHED_VERSION = "0.19.8"
_applied = False


def device_clip_scale(total_norm, loss_scale: float, clip_grad: float):
    """loss_scale x max(1, (norm / loss_scale + 1e-6) / clip_grad) for a tensor norm, without
    reading it: a NaN, infinite or negative (DeepSpeed's invalid sentinel) norm counts as inf."""
    if torch.is_tensor(total_norm):
        valid = torch.isfinite(total_norm) & (total_norm >= 0)
        norm = torch.where(valid, total_norm, torch.full_like(total_norm, math.inf))
    else:
        norm = total_norm if math.isfinite(float(total_norm)) and total_norm >= 0 else math.inf
        norm = torch.tensor(float(norm), dtype=torch.float)
    clip = torch.clamp(((norm / loss_scale) + 1e-6) / clip_grad, min=1.0)
    return clip * loss_scale


def _unscale_and_clip_grads(self, grad_groups_flat, total_norm):
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        combined_scale = device_clip_scale(total_norm, self.loss_scale, self.clip_grad)
    for grad in grad_groups_flat:
        for g in (grad if isinstance(grad, list) else [grad]):
            g.data.mul_(1.0 / combined_scale)


def _scaled_global_norm_one_model_parallel_reduce(original):
    def scaled_global_norm(self, norm_type=2):
        # DeepSpeed's own computation with its model-parallel all-reduces switched off for this call
        # (an instance attribute shadows the method), then one all-reduce of the squared total.
        self._model_parallel_all_reduce = lambda tensor, op: None
        try:
            stage_norm = original(self, norm_type)  # inf when a group's norm was invalid
        finally:
            del self._model_parallel_all_reduce
        squared = stage_norm.float().pow(2)
        self._model_parallel_all_reduce(tensor=squared, op=torch.distributed.ReduceOp.SUM)
        return squared.sqrt()

    return scaled_global_norm


def apply() -> bool:
    """Install the patches (idempotent). Returns whether they are installed."""
    global _applied
    if _applied:
        return True
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if deepspeed.__version__ != PATCHED_VERSION:
        return False
    DeepSpeedZeroOptimizer.original_unscale_and_clip_grads = DeepSpeedZeroOptimizer.unscale_and_clip_grads
    DeepSpeedZeroOptimizer.unscale_and_clip_grads = _unscale_and_clip_grads
    DeepSpeedZeroOptimizer.scaled_global_norm = _scaled_global_norm_one_model_parallel_reduce(
        DeepSpeedZeroOptimizer.scaled_global_norm)
    _applied = True
    return True


def expert_group_name(expert_parallel: int) -> str:
    """DeepSpeed's name of the expert groups of an expert-parallel size (its ``ep_size_<N>``)."""
    return f"ep_size_{expert_parallel}"


def adopt_expert_groups(model, expert_parallel_group, expert_data_parallel_group, num_experts: int) -> str:
    """Make DeepSpeed's engine treat ``model``'s expert parameters (those megatron-core marks
    ``allreduce = False``) as its own MoE parameters, over megatron-core's expert-parallel and
    expert-data-parallel groups; call before ``deepspeed.initialize``. Returns the group name the
    expert parameters and param groups carry."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    expert_parallel = torch.distributed.get_world_size(expert_parallel_group)
    name = expert_group_name(expert_parallel)

    def register() -> None:
        for registry, group in ((groups._EXPERT_PARALLEL_GROUP, expert_parallel_group),
                                (groups._EXPERT_DATA_PARALLEL_GROUP, expert_data_parallel_group)):
            registry[name] = group
        groups._EXPERT_PARALLEL_GROUP_RANKS[name] = torch.distributed.get_process_group_ranks(expert_parallel_group)
        groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = torch.distributed.get_process_group_ranks(
            expert_data_parallel_group)

    class ExpertGroupsMarker(MoE):
        """No weights and no forward: its presence makes the engine take its MoE paths. It holds no
        local experts, so DeepSpeed's per-expert checkpoint files get nothing from it."""

        def __init__(self):
            torch.nn.Module.__init__(self)
            self.ep_size, self.num_experts, self.num_local_experts = expert_parallel, num_experts, 0
            self.expert_group_name = name
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_=False):
            register()

        def forward(self, *args, **kwargs):
            raise RuntimeError("the expert-groups marker is not a layer")

    register()
    for p in model.parameters():
        if getattr(p, "allreduce", True) is False:
            p.group_name = name
    model.deepspeed_expert_groups = ExpertGroupsMarker()
    return name


class UniversalGroupsError(ValueError):
    """A universal checkpoint without a param group this optimizer has; the message is one line."""


@contextlib.contextmanager
def universal_param_groups_paired_by(key: Callable[[dict], Hashable], local_keys: Iterable[str] = ()):
    """During a universal-checkpoint load: each of the optimizer's param groups takes the saved group
    with the same ``key`` (not the one at its position), whose ``local_keys`` (what differs between
    layouts, e.g. the names of the group's parameters here) are not copied over. Saved groups whose
    keys are not distinct (another trainer's) keep DeepSpeed's pairing by position."""
    from deepspeed.runtime import base_optimizer

    cls = base_optimizer.ZeROOptimizer
    original = cls.load_hp_checkpoint_state_from_checkpoint_dir
    if deepspeed_version() != PATCHED_VERSION:
        yield
        return
    local_keys = tuple(local_keys)

    def load_hp_checkpoint_state_from_checkpoint_dir(self, lp_groups_name, checkpoint_dir):
        path = os.path.join(checkpoint_dir, "zero", "optimizer_state.pt")
        saved = torch.load(path, weights_only=False)
        by_key = {}
        for group in saved["param_groups"]:
            by_key.setdefault(key(group), {k: v for k, v in group.items() if k not in local_keys})
        if len(by_key) < len(saved["param_groups"]):  # keys that do not tell the groups apart: by position
            return original(self, lp_groups_name, checkpoint_dir)
        paired = []
        for group in self.optimizer.param_groups:
            if key(group) not in by_key:
                raise UniversalGroupsError(f"{checkpoint_dir}: no param group {key(group)} in the universal "
                                           f"checkpoint (it has {sorted(map(str, by_key))})")
            paired.append(dict(by_key[key(group)], **{k: group[k] for k in local_keys if k in group}))
        saved["param_groups"] = paired
        module = sys.modules[original.__module__]
        real = module.torch
        module.torch = torch_with(load=lambda p, *a, **k: saved if p == path else real.load(p, *a, **k))
        try:
            return original(self, lp_groups_name, checkpoint_dir)
        finally:
            module.torch = real

    cls.load_hp_checkpoint_state_from_checkpoint_dir = load_hp_checkpoint_state_from_checkpoint_dir
    try:
        yield
    finally:
        cls.load_hp_checkpoint_state_from_checkpoint_dir = original


def deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__
