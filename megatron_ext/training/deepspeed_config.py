"""The DeepSpeed config: generated from the flags; a user's ``--deepspeed-config`` file wins for
every key it sets, except that its batch sizes must agree with the flags (DeepSpeed would
otherwise fail later, or train a different batch than the one logged). ``engine_settings`` reads
the engine the merged config gives (the run plan checks every rule against that)."""
import json
from typing import Optional

from megatron_ext.registry import EngineSettings
from megatron_ext.optimizers import OPTIMIZERS

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class DeepSpeedConfigError(ValueError):
    pass


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_deepspeed_config(args) -> dict:
    config = {
        "train_batch_size": args.global_batch_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": args.clip_grad,
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": bool(args.bf16)},
        "fp16": {"enabled": bool(args.fp16), "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our own log line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if args.cpu_optimizer:
        # The client optimizer (ours) runs on the CPU copy; DeepSpeed's CPUAdam would need a compile.
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    if args.deepspeed_config:
        user = read_deepspeed_json(args.deepspeed_config)
        for key in BATCH_KEYS:
            if key in user and user[key] not in ("auto", config[key]):
                raise DeepSpeedConfigError(
                    f"--deepspeed-config {args.deepspeed_config}: {key}={user[key]} disagrees with the flags "
                    f"({config[key]})"
                )
        config = _merge(config, {k: v for k, v in user.items() if k not in BATCH_KEYS})
    if getattr(args, "universal_checkpoint", False):
        config = _merge(config, {"checkpoint": {"load_universal": True}})
    if getattr(args, "pipeline_model_parallel_size", 1) > 1:
        # megatron-core's pipeline schedule runs the micro-batches' forward and backward passes; the
        # engine's step is the accumulation boundary (training/pipeline.py)
        config["managed_gradient_accumulation"] = False
    engine = engine_settings(config, 1)
    if engine.cpu_offload:  # also when the user's JSON asks for the offload
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    if fp32_gradient_accumulation(args, engine) is None:
        config = _merge(config, {"data_types": {"grad_accum_dtype": "fp32"}})
    return config


def read_deepspeed_json(path: str, flag: str = "--deepspeed-config") -> dict:
    """A user's DeepSpeed JSON file as a dict; any problem is one line naming it."""
    try:
        with open(path) as f:
            user = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DeepSpeedConfigError(f"{flag} {path}: {e}") from None
    if not isinstance(user, dict):
        raise DeepSpeedConfigError(f"{flag} {path}: top level must be an object")
    return user


def fp32_gradient_accumulation(args, engine: EngineSettings) -> Optional[str]:
    """``--accumulate-allreduce-grads-in-fp32``: None when it applies (bf16 weights at ZeRO 1 without
    offload, DeepSpeed 0.19.8's bf16 optimizer, and an optimizer that runs under it), else why not
    (fp32 runs accumulate in fp32 anyway; elsewhere DeepSpeed accumulates in the weights' precision)."""

    if not getattr(args, "accumulate_allreduce_grads_in_fp32", False) or engine.precision == "fp32":
        return "fp32"
    if engine.precision != "bf16" or engine.zero_stage != 1 or engine.cpu_offload:
        return (f"DeepSpeed accumulates gradients in fp32 only for bf16 at ZeRO 1 without offload (this run: "
                f"{engine.precision}, ZeRO {engine.zero_stage}{', offload' if engine.cpu_offload else ''})")
    if not OPTIMIZERS.get(args.optimizer).engine.bf16_optimizer:
        return f"--optimizer {args.optimizer} does not run under DeepSpeed's bf16 optimizer"
    return None


def engine_settings(config: dict, tensor_parallel: int, pipeline_parallel: int = 1,
                    expert_parallel: int = 1) -> EngineSettings:
    """The engine a (merged) DeepSpeed config gives, for a layout."""
    zero = config.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in (None, "none")
    enabled = lambda key: bool((config.get(key) or {}).get("enabled", False))  # noqa: E731
    precision = "bf16" if enabled("bf16") else "fp16" if enabled("fp16") else "fp32"
    return EngineSettings(zero_stage=int(zero.get("stage", 0)), cpu_offload=offload,
                          tensor_parallel=tensor_parallel, precision=precision, pipeline_parallel=pipeline_parallel,
                          expert_parallel=expert_parallel)
