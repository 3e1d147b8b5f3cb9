"""``adam``: Adam with L2-coupled weight decay (``torch.optim.Adam``).

Decision (issue 5): ``--optimizer adam`` is *classic* Adam, whose weight decay is an L2 penalty
added to the gradient before the adaptive normalisation (``g += wd * p``), which is what
argonne-lcf/Megatron-DeepSpeed builds for ``--optimizer adam`` (``torch.optim.Adam``). Upstream
Megatron-LM's ``adam`` runs in decoupled (AdamW) mode: users who want that use ``adamw`` (the
default optimizer). The two share ``--adam-beta1/--adam-beta2/--adam-eps``; with
``--weight-decay 0`` they take identical steps.
"""
import torch

from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.optimizers.adamw import ADAM_ARGS, validate_adam_args
from megatron_ext.optimizers.common.state_memory import TWO_MOMENTS


@OPTIMIZERS.register(
    "adam",
    description="Adam with L2-coupled weight decay g += wd*p (torch.optim.Adam); "
    "decoupled decay is 'adamw'",
    arguments=ADAM_ARGS,
    validate=validate_adam_args,
    memory=TWO_MOMENTS,
)
def build_adam(param_groups, args):
    return torch.optim.Adam(
        param_groups,
        lr=args.lr,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_eps,
        weight_decay=args.weight_decay,
    )
