"""``sgdschedulefree`` (aliases ``schedulefree-sgd``, ``sfsgd``): Schedule-Free SGD
(Defazio et al. 2024), Meta's ``schedulefree`` package (``SGDScheduleFree``), momentum from
``--sgd-momentum`` (must be in (0, 1)). Weight decay is the library's L2 term on the gradient.
Evaluation/checkpoint weights, exactness and DeepSpeed handling as ``adamwschedulefree`` (see
``schedulefree_adamw.py``). Schedule-free SGD wants a much larger lr than Adam (library default 1.0).
"""
from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.optimizers.common.hooks import SWITCHES_EVALUATION_WEIGHTS
from megatron_ext.optimizers.common.state_memory import OptimizerMemory, constant, elementwise_temporaries
from megatron_ext.optimizers.schedulefree_adamw import (
    SCHEDULEFREE_ARGS,
    ExactModeSwitch,
    start_in_train_mode,
    validate_schedulefree_common,
)
from megatron_ext.optimizers.sgd import SGD_MOMENTUM, sgd_width_lr_exponents


def validate_sf_sgd_args(args):
    if not 0.0 < args.sgd_momentum < 1.0:
        raise ValueError(f"--sgd-momentum must be in (0, 1) for sgdschedulefree, got {args.sgd_momentum}")
    validate_schedulefree_common(args)


def _sgd_class():
    import schedulefree

    class SGDScheduleFree(ExactModeSwitch, schedulefree.SGDScheduleFree):
        pass

    return SGDScheduleFree


@OPTIMIZERS.register(
    "sgdschedulefree",
    description="Schedule-Free SGD (Meta schedulefree); evaluation and checkpoints use the averaged weights",
    aliases=("schedulefree-sgd", "sfsgd"),
    arguments=(SGD_MOMENTUM,) + SCHEDULEFREE_ARGS,
    validate=validate_sf_sgd_args,
    width_lr_exponents=sgd_width_lr_exponents,
    engine=SWITCHES_EVALUATION_WEIGHTS,
    memory=OptimizerMemory(state=constant(1), workspace=elementwise_temporaries(1, 1), notes="z"),
)
def build_sf_sgd(param_groups, args):
    optimizer = _sgd_class()(
        param_groups,
        lr=args.lr,
        momentum=args.sgd_momentum,
        weight_decay=args.weight_decay,
        warmup_steps=args.schedulefree_warmup_steps,
        r=args.schedulefree_r,
        weight_lr_power=args.schedulefree_weight_lr_power,
        foreach=args.schedulefree_for_each,
    )
    start_in_train_mode(optimizer)
    return optimizer
