"""``lion``: Lion (Chen et al. 2023, arXiv 2302.06675), from ``pytorch-optimizer`` (``Lion``).

Per element: ``u = sign(beta1*m + (1-beta1)*g)``; ``p *= 1 - lr*wd`` (decoupled);
``p -= lr*u``; ``m = beta2*m + (1-beta2)*g``. Element-wise, so it is exact on DeepSpeed's flat
ZeRO partitions. Lion's update has unit magnitude per element: its lr is typically 3-10x smaller
than AdamW's and its weight decay 3-10x larger.
"""
from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.optimizers.common.state_memory import OptimizerMemory, constant, elementwise_temporaries
from megatron_ext.optimizers.common.validation import check_betas
from megatron_ext.registry import Arg

LION_ARGS = (
    Arg("--lion-beta1", type=float, default=0.9, help="Lion interpolation coefficient of the update"),
    Arg("--lion-beta2", type=float, default=0.99, help="Lion momentum decay"),
)


def validate_lion_args(args):
    check_betas(args, "--lion-beta1", "--lion-beta2")


@OPTIMIZERS.register(
    "lion",
    description="Lion sign-momentum optimizer, decoupled weight decay (pytorch-optimizer Lion)",
    arguments=LION_ARGS,
    validate=validate_lion_args,
    # exp_avg; the update is a sign of an interpolation built in one temporary
    memory=OptimizerMemory(state=constant(1), workspace=elementwise_temporaries(1, 1), notes="exp_avg"),
)
def build_lion(param_groups, args):
    from pytorch_optimizer.optimizer.lion import Lion

    return Lion(
        param_groups,
        lr=args.lr,
        betas=(args.lion_beta1, args.lion_beta2),
        weight_decay=args.weight_decay,
        weight_decouple=True,
        fixed_decay=False,
    )
