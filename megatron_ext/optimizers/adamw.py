"""``adamw``: torch's AdamW (decoupled weight decay), the default optimizer."""
import torch

from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.registry import Arg

ADAM_ARGS = (
    Arg("--adam-beta1", type=float, default=0.9, help="Adam beta1"),
    Arg("--adam-beta2", type=float, default=0.999, help="Adam beta2"),
    Arg("--adam-eps", type=float, default=1e-8, help="Adam epsilon"),
)


def validate_adam_args(args):
    for flag, value in (("--adam-beta1", args.adam_beta1), ("--adam-beta2", args.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{flag} must be in [0, 1), got {value}")
    if not args.adam_eps > 0:
        raise ValueError(f"--adam-eps must be > 0, got {args.adam_eps}")


# Megatron-DeepSpeed's apex.adam is apex FusedAdam in its default adam_w_mode: decoupled decay.
@OPTIMIZERS.register("adamw", aliases=["apex.adam"], description="AdamW, decoupled weight decay (torch.optim.AdamW)",
                     arguments=ADAM_ARGS)
def build_adamw(param_groups, args):
    return torch.optim.AdamW(
        param_groups,
        lr=args.lr,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_eps,
        weight_decay=args.weight_decay,
    )


build_adamw.validate_args = validate_adam_args
