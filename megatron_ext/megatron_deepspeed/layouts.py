"""The fork's parallel layouts that cannot run with the plug-ins, refused in one line at argument
parsing, before the model is built (docs/megatron_deepspeed.md, "Parallel layouts").

DeepSpeed decides the engine from the fork's DeepSpeed JSON (``--deepspeed_config``), not from the
fork's ``--zero-stage``, so that is what is read here:

* the pipeline model (``GPTModelPipe``, the fork's default without ``--no-pipeline-parallel``) runs on
  DeepSpeed's pipeline engine, which takes ZeRO 0 and 1 only (DeepSpeed asserts it after the model
  is built; refused here first);
* the pipeline model with DeepSpeed-MoE needs an MoE layer on the first stage: a stage passes the
  MoE loss on with its activations, and the first stage's is a constant without a gradient when it
  holds no MoE layer, on which DeepSpeed's pipeline backward fails (the fork alone too);
* DeepSpeed wraps the optimizer in its bf16 optimizer (bf16 weights, fp32 gradient accumulation
  and master weights in flat partitions of its own) for bf16 on the pipeline engine at ZeRO 0, and
  for bf16 at ZeRO 1 with ``data_types.grad_accum_dtype`` fp32 (no offload). Our optimizers that
  declare they do not run under it (``EngineSupport.bf16_optimizer``: Muon and Shampoo gather whole
  matrices from ZeRO 0/1/2 layouts, LAMB's trust ratios, schedule-free's evaluation weights) are
  refused there, naming the setting that works.

``mark_whole_experts``: the fork's DeepSpeed-MoE experts without ``--enable-expert-tensor-parallelism``
are whole on every tensor-parallel rank, but their linear layers still mark them tensor-parallel;
they are marked whole for our optimizers (Muon, Shampoo, LAMB gather tensor-parallel shards) and init.
"""
from __future__ import annotations

import json
from typing import Optional

from megatron_ext.megatron_deepspeed import project_api
from megatron_ext.megatron_deepspeed.ownership import Ownership


def deepspeed_config(args) -> dict:
    """The fork's DeepSpeed JSON (``{}`` when unreadable: the fork reports that itself)."""
    config = getattr(args, "deepspeed_config", None)
    if isinstance(config, dict):
        return config
    if not config or not getattr(args, "deepspeed", False):
        return {}
    try:
        with open(config, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def bf16_optimizer_reason(config: dict, pipeline: bool) -> Optional[str]:
    """Why DeepSpeed would wrap the optimizer in its bf16 optimizer with ``config``, or None
    (DeepSpeed 0.19's ``_do_optimizer_sanity_check``)."""
    if not (config.get("bf16") or {}).get("enabled", False):
        return None
    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in (None, "none")
    accumulate = str((config.get("data_types") or {}).get("grad_accum_dtype") or "bf16").lower()
    if stage == 0 and pipeline:
        return "for bf16 on its pipeline engine at ZeRO 0; use ZeRO 1"
    if stage == 1 and accumulate in ("fp32", "float32", "float") and not offload:
        return ("for bf16 at ZeRO 1 with data_types.grad_accum_dtype fp32; drop that setting (gradients then "
                "accumulate in bf16)" + ("" if pipeline else " or use ZeRO 2"))
    return None


def check(args, owner: Ownership) -> None:
    """Raise ValueError (one line) for a layout the plug-ins cannot run."""
    config = deepspeed_config(args)
    pipeline = bool(getattr(args, "ds_pipeline_enabled", False)) and bool(getattr(args, "deepspeed", False))
    stage = int((config.get("zero_optimization") or {}).get("stage", 0))
    if pipeline and stage >= 2:
        raise ValueError(f"ZeRO stage {stage} ({args.deepspeed_config}) with the pipeline model: DeepSpeed's pipeline "
                         "engine (GPTModelPipe, the fork's default) runs ZeRO 0 and 1 only; use ZeRO 1 or "
                         "--no-pipeline-parallel")
    pp = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
    experts = getattr(args, "num_experts", None) or [1]
    interval = int(getattr(args, "expert_interval", 1) or 1)
    first_stage = -(-int(getattr(args, "num_layers", 0) or 0) // pp)  # at most this many layers
    if pipeline and pp > 1 and max(experts if isinstance(experts, list) else [experts]) > 1 and interval > first_stage:
        raise ValueError(f"--num-experts with the pipeline model: the first of {pp} pipeline stages holds no MoE layer "
                         f"(one layer in --expert-interval {interval} is one), and DeepSpeed's pipeline backward then "
                         "fails on the MoE loss it passes on (the fork's GPTModelPipe, with or without the plug-ins); "
                         "use a smaller --expert-interval or fewer pipeline stages")
    if owner.ours("optimizer"):
        why = bf16_optimizer_reason(config, pipeline)
        optimizers, _, _ = project_api.registries()
        if why and not optimizers.get(args.optimizer).engine.bf16_optimizer:
            raise ValueError(f"--optimizer {args.optimizer} does not run under DeepSpeed's bf16 optimizer, which "
                             f"DeepSpeed uses {why}")


def mark_whole_experts(models) -> None:
    for model in models:
        for module in model.modules():
            if getattr(module, "is_expert_without_slicing", False):  # the fork's Column/RowParallelLinear
                for param in module.parameters(recurse=False):
                    project_api.mark_whole_on_tp_ranks(param)
