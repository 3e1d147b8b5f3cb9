"""``adopt``: ADOPT (Taniguchi et al. 2024, arXiv 2411.02853), from ``pytorch-optimizer``
(``ADOPT``).

Per element, at step t (1-based): the first step only initialises ``v = g^2`` (no update); then
``n = clip(g / max(sqrt(v), eps), t^c)`` with ``c = --adopt-clip-exponent`` (0.25; a negative value
disables clipping), ``m = beta1*m + (1-beta1)*n``, ``p -= lr*m``, and only then
``v = beta2*v + (1-beta2)*g^2`` (the current gradient never normalises itself). Weight decay is
decoupled (``p *= 1 - lr*wd`` every step) unless ``--no-adopt-decoupled-weight-decay`` (then L2,
added to the gradient). Element-wise, so exact on DeepSpeed's flat ZeRO partitions.
"""
import argparse

from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.optimizers.common.state_memory import TWO_MOMENTS
from megatron_ext.optimizers.common.validation import check_betas, check_positive
from megatron_ext.registry import Arg

ADOPT_ARGS = (
    Arg("--adopt-beta1", type=float, default=0.9, help="ADOPT momentum"),
    Arg("--adopt-beta2", type=float, default=0.9999, help="ADOPT second-moment decay (paper 0.9999)"),
    Arg("--adopt-eps", type=float, default=1e-6, help="ADOPT floor of sqrt(v) (paper 1e-6)"),
    Arg("--adopt-clip-exponent", type=float, default=0.25,
        help="clip the normalised gradient to +-step^c (paper c=0.25); negative: no clipping"),
    Arg("--adopt-decoupled-weight-decay", action=argparse.BooleanOptionalAction, default=True,
        help="decoupled (AdamW-style) weight decay; --no-adopt-decoupled-weight-decay: L2 on the gradient"),
)


def validate_adopt_args(args):
    check_betas(args, "--adopt-beta1", "--adopt-beta2")
    check_positive(args, "--adopt-eps")


def _clip(exponent):
    return None if exponent < 0 else (lambda step: float(step) ** exponent)


@OPTIMIZERS.register(
    "adopt",
    description="ADOPT: Adam normalised by the previous second moment, clipped (pytorch-optimizer ADOPT)",
    arguments=ADOPT_ARGS,
    validate=validate_adopt_args,
    memory=TWO_MOMENTS,
)
def build_adopt(param_groups, args):
    from pytorch_optimizer.optimizer.adopt import ADOPT

    return ADOPT(
        param_groups,
        lr=args.lr,
        betas=(args.adopt_beta1, args.adopt_beta2),
        eps=args.adopt_eps,
        clip_lambda=_clip(args.adopt_clip_exponent),
        weight_decay=args.weight_decay,
        weight_decouple=args.adopt_decoupled_weight_decay,
        fixed_decay=False,
    )
