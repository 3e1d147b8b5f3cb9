"""``adamw``: torch's AdamW (decoupled weight decay), the default optimizer."""
import torch

from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.optimizers.common.state_memory import TWO_MOMENTS
from megatron_ext.optimizers.common.validation import check_betas, check_positive
from megatron_ext.registry import Arg

ADAM_ARGS = (
    Arg("--adam-beta1", type=float, default=0.9, help="Adam beta1"),
    Arg("--adam-beta2", type=float, default=0.999, help="Adam beta2"),
    Arg("--adam-eps", type=float, default=1e-8, help="Adam epsilon"),
)


def validate_adam_args(args):
    check_betas(args, "--adam-beta1", "--adam-beta2")
    check_positive(args, "--adam-eps")


# Megatron-DeepSpeed's apex.adam is apex FusedAdam in its default adam_w_mode: decoupled decay.
@OPTIMIZERS.register("adamw", aliases=["apex.adam"], description="AdamW, decoupled weight decay (torch.optim.AdamW)",
                     arguments=ADAM_ARGS, validate=validate_adam_args, memory=TWO_MOMENTS)
def build_adamw(param_groups, args):
    return torch.optim.AdamW(
        param_groups,
        lr=args.lr,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_eps,
        weight_decay=args.weight_decay,
    )
