"""The DeepSpeed config: generated from the flags; a user's ``--deepspeed-config`` file wins for
every key it sets, except that its batch sizes must agree with the flags (DeepSpeed would
otherwise fail later, or train a different batch than the one logged)."""
import json

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
        try:
            with open(args.deepspeed_config) as f:
                user = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DeepSpeedConfigError(f"--deepspeed-config {args.deepspeed_config}: {e}") from None
        if not isinstance(user, dict):
            raise DeepSpeedConfigError(f"--deepspeed-config {args.deepspeed_config}: top level must be an object")
        for key in BATCH_KEYS:
            if key in user and user[key] not in ("auto", config[key]):
                raise DeepSpeedConfigError(
                    f"--deepspeed-config {args.deepspeed_config}: {key}={user[key]} disagrees with the flags "
                    f"({config[key]})"
                )
        config = _merge(config, {k: v for k, v in user.items() if k not in BATCH_KEYS})
        args.zero_stage = config.get("zero_optimization", {}).get("stage", args.zero_stage)
    if getattr(args, "universal_checkpoint", False):
        config = _merge(config, {"checkpoint": {"load_universal": True}})
    args.universal_checkpoint = bool(config.get("checkpoint", {}).get("load_universal", False))
    if args.universal_checkpoint and args.zero_stage not in (1, 2):
        # Verified: ZeRO 0 fails reading the optimizer state, ZeRO 3 finds no model-states files.
        raise DeepSpeedConfigError(f"--universal-checkpoint needs --zero-stage 1 or 2 (DeepSpeed 0.19.8 cannot "
                                   f"load a universal checkpoint at ZeRO {args.zero_stage})")
    return config
