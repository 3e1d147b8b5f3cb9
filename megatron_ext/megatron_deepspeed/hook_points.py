"""The names in the fork the plug-ins hook, looked up BY NAME (other commits of the fork move
lines, not names). A missing name, or one whose parameters changed, stops the run in one line
before anything is patched: a half-patched fork would silently train with the fork's own pieces.

Line numbers of the pinned fixture (ffa3456d) for orientation: ``megatron/initialize.py`` binds
``parse_args``/``validate_args`` (:21) and calls them (:54, :64); ``megatron/training.py`` binds
``get_megatron_optimizer`` (:59), ``load_checkpoint``/``save_checkpoint`` (:45) and defines
``get_model`` (:413), ``get_optimizer_param_scheduler`` (:562), ``setup_model_and_optimizer``
(:672), ``train_step`` (:858), ``train`` (:1025, inline LR finder :1087), ``evaluate`` (:1492).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Dict, Tuple

from megatron_ext.megatron_deepspeed.errors import ActivationError


@dataclasses.dataclass(frozen=True)
class HookPoint:
    module: str
    name: str
    purpose: str
    parameters: Tuple[str, ...] = ()  # parameter names the wrapper reads (by name)

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


PATCHED = (
    HookPoint("megatron.initialize", "parse_args", "adds the plug-ins' flags", ("extra_args_provider",)),
    HookPoint("megatron.initialize", "validate_args", "checks the plug-ins' flags before any work", ("args",)),
    HookPoint("megatron.training", "get_model", "applies the init and parametrization", ("model_provider_func",)),
    HookPoint("megatron.training", "get_megatron_optimizer", "builds the optimizer", ("model",)),
    HookPoint("megatron.training", "get_optimizer_param_scheduler", "builds the LR schedule", ("optimizer",)),
    HookPoint("megatron.training", "setup_model_and_optimizer", "calls the optimizer's engine hooks"),
    HookPoint("megatron.training", "load_checkpoint", "calls engine_ready before a checkpoint loads", ("model",)),
    HookPoint("megatron.training", "train_step", "runs SophiaG's curvature pass",
              ("forward_step_func", "data_iterator", "model", "optimizer", "opt_param_scheduler")),
    HookPoint("megatron.training", "train", "runs megatron_ext's LR finder",
              ("forward_step_func", "model", "optimizer", "opt_param_scheduler", "train_data_iterator")),
    HookPoint("megatron.training", "evaluate", "evaluates with the optimizer's evaluation weights"),
    HookPoint("megatron.training", "save_checkpoint", "saves the optimizer's evaluation weights"),
)

USED = (  # read, not patched
    HookPoint("megatron", "get_args", "the parsed arguments"),
    HookPoint("megatron", "get_timers", "the LR finder's training steps"),
    HookPoint("megatron", "get_tokenizer", "SophiaG's curvature pass (end-of-document token)"),
    HookPoint("megatron", "get_num_microbatches", "SophiaG's curvature pass"),
    HookPoint("megatron.arguments", "core_transformer_config_from_args", "the LR finder's training steps"),
    HookPoint("megatron.utils", "get_ltor_masks_and_position_ids", "SophiaG's curvature pass (loss mask)"),
)


def resolve() -> Dict[str, object]:
    """``{qualname: object}`` of every hook point; raises ActivationError (one line) for the
    first one missing or changed."""
    found = {}
    for point in PATCHED + USED:
        try:
            module = importlib.import_module(point.module)
        except ImportError as e:
            raise ActivationError(_missing(point, f"cannot import {point.module} ({e})")) from None
        obj = getattr(module, point.name, None)
        if obj is None:
            raise ActivationError(_missing(point, f"{point.module} has no {point.name}"))
        if point.parameters:
            try:
                names = set(inspect.signature(obj).parameters)
            except (TypeError, ValueError):
                names = set()
            lacking = [p for p in point.parameters if p not in names]
            if lacking:
                raise ActivationError(_missing(point, f"{point.qualname} has no parameter {lacking[0]}"))
        found[point.qualname] = obj
    return found


def _missing(point: HookPoint, what: str) -> str:
    return (f"this Megatron-DeepSpeed checkout does not fit: {what} (the hook point that {point.purpose}); "
            "run it without the plug-ins (MEGATRON_EXT_PLUGINS=off) or use a fork commit with that name")
