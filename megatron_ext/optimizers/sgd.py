"""``sgd``: SGD with (optionally Nesterov) momentum, ``torch.optim.SGD``.

Weight decay is torch's: an L2 term added to the gradient (``g += wd * p``) before momentum, as in
Megatron-DeepSpeed's ``--optimizer sgd``. ``apex.sgd`` (apex's FusedSGD, same update rule) is an
alias. Momentum 0 gives plain SGD.
"""
import torch

from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.optimizers.common.state_memory import OptimizerMemory, elementwise_temporaries
from megatron_ext.registry import Arg

SGD_MOMENTUM = Arg("--sgd-momentum", type=float, default=0.9, help="SGD momentum (Megatron default 0.9)")
SGD_ARGS = (
    SGD_MOMENTUM,
    Arg("--sgd-nesterov", action="store_true", default=False, help="Nesterov momentum (needs --sgd-momentum > 0)"),
    Arg("--sgd-dampening", type=float, default=0.0, help="dampening of the momentum (torch SGD)"),
)


def validate_sgd_args(args):
    if not 0.0 <= args.sgd_momentum < 1.0:
        raise ValueError(f"--sgd-momentum must be in [0, 1), got {args.sgd_momentum}")
    if not 0.0 <= args.sgd_dampening <= 1.0:
        raise ValueError(f"--sgd-dampening must be in [0, 1], got {args.sgd_dampening}")
    if args.sgd_nesterov and (args.sgd_momentum <= 0 or args.sgd_dampening != 0):
        raise ValueError("--sgd-nesterov needs --sgd-momentum > 0 and --sgd-dampening 0")


def sgd_width_lr_exponents(args):
    """muP for SGD (Tensor Programs V, Table 3, with the 1/m_N logit multiplier): hidden LR
    constant; vector-like parameters (embeddings, norms, biases) and the output layer x m_N."""
    return {"hidden": 0.0, "embedding": 1.0, "norm": 1.0, "final_norm": 1.0, "bias": 1.0, "output": 1.0}


# the momentum buffer (none without momentum); the L2 term is added to a copy of the gradient
SGD_MEMORY = OptimizerMemory(state=lambda args, role: 1 if args.sgd_momentum > 0 else 0,
                             workspace=elementwise_temporaries(1, 1), notes="momentum_buffer")


@OPTIMIZERS.register(
    "sgd",
    description="SGD with momentum/Nesterov, L2-coupled weight decay (torch.optim.SGD)",
    aliases=("apex.sgd",),
    arguments=SGD_ARGS,
    validate=validate_sgd_args,
    width_lr_exponents=sgd_width_lr_exponents,
    memory=SGD_MEMORY,
)
def build_sgd(param_groups, args):
    return torch.optim.SGD(
        param_groups,
        lr=args.lr,
        momentum=args.sgd_momentum,
        dampening=args.sgd_dampening,
        nesterov=args.sgd_nesterov,
        weight_decay=args.weight_decay,
    )
