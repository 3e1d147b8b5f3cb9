"""``adamwschedulefree`` (aliases ``schedulefree-adamw``, ``sfadamw``): Schedule-Free AdamW
(Defazio et al. 2024, arXiv 2405.15682), Meta's ``schedulefree`` package (``AdamWScheduleFree``).

Schedule-free keeps two sequences: gradients are taken at ``y`` (what the model holds while
training) and the weights to evaluate and keep are the running average ``x``. The library's
``eval()``/``train()`` interpolate the parameters between the two; the trainer switches through the
hook protocol (``megatron_ext.optimizers.common.hooks``): evaluation and checkpoint saving see ``x``
(checkpoints hold the averaged weights), training sees ``y``. Two things the library alone does not
give and this plug-in adds:

* exactness: ``train()`` after ``eval()`` is an interpolation, not bit-exact; the training weights
  are kept (in the optimizer state, key ``train_weights``, so a checkpoint written in eval mode
  carries them) while in eval mode and copied back, so an evaluation or a save never perturbs
  the run and a resumed run continues bit-for-bit;
* DeepSpeed: the optimizer switches DeepSpeed's master weights (fp32 copies, or flat ZeRO 1/2
  partitions), which are not the tensors the forward pass reads; the hook copies them into the
  model after each switch (``hooks.sync_model_from_master``). ZeRO 3 is refused.

The LR schedule still applies (``group['lr']`` each iteration): warm up with ``--lr-warmup-*`` and
use ``--lr-decay-style constant`` for the schedule-free recipe (or a cooldown). The library's own
warmup (``--schedulefree-warmup-steps``) is off by default so warmup is not applied twice.
"""
import argparse

from megatron_ext.optimizers import OPTIMIZERS
from megatron_ext.optimizers.adamw import ADAM_ARGS, validate_adam_args
from megatron_ext.optimizers.common.hooks import SWITCHES_EVALUATION_WEIGHTS
from megatron_ext.optimizers.common.state_memory import OptimizerMemory, constant, elementwise_temporaries
from megatron_ext.registry import Arg

SCHEDULEFREE_ARGS = (
    Arg("--schedulefree-warmup-steps", type=int, default=0,
        help="the library's internal linear warmup in steps (default 0: use --lr-warmup-*)"),
    Arg("--schedulefree-r", type=float, default=0.0, help="polynomial weighting power r of the average"),
    Arg("--schedulefree-weight-lr-power", type=float, default=2.0,
        help="average weights proportional to lr_max^power (library default 2)"),
    Arg("--schedulefree-for-each", action=argparse.BooleanOptionalAction, default=True,
        help="use the library's foreach (multi-tensor) implementation"),
)


def validate_schedulefree_common(args):
    if args.schedulefree_warmup_steps < 0:
        raise ValueError(f"--schedulefree-warmup-steps must be >= 0, got {args.schedulefree_warmup_steps}")
    if args.schedulefree_r < 0:
        raise ValueError(f"--schedulefree-r must be >= 0, got {args.schedulefree_r}")
    if args.schedulefree_weight_lr_power < 0:
        raise ValueError(f"--schedulefree-weight-lr-power must be >= 0, got {args.schedulefree_weight_lr_power}")


def start_in_train_mode(optimizer):
    """A fresh optimizer has no average yet, so train mode is just the flag. (Not the library's
    ``train()``: it would create empty state entries for the model's tensors, which DeepSpeed's
    ZeRO then replaces by flat partitions, and ``state_dict()`` would fail on the stale keys.)"""
    for group in optimizer.param_groups:
        group["train_mode"] = True


class ExactModeSwitch:
    """Mixin over a ``schedulefree`` optimizer: the hook protocol's ``eval_mode``/``train_mode``
    with a bit-exact return to the training weights."""

    def eval_mode(self) -> bool:
        import torch

        changed = False
        with torch.no_grad():
            for group in self.param_groups:
                if not group["train_mode"]:
                    continue
                for p in group["params"]:
                    if p in self.state and "z" in self.state[p]:
                        self.state[p]["train_weights"] = p.detach().clone()
                        changed = True
        self.eval()
        return changed

    def train_mode(self) -> bool:
        import torch

        if all(group["train_mode"] for group in self.param_groups):
            return False
        self.train()  # the library's interpolation back to y, then the exact y where we kept it
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    saved = self.state[p].pop("train_weights", None) if p in self.state else None
                    if saved is not None:
                        p.copy_(saved)
        return True


def _adamw_class():
    import schedulefree

    class AdamWScheduleFree(ExactModeSwitch, schedulefree.AdamWScheduleFree):
        pass

    return AdamWScheduleFree


def validate_sf_adamw_args(args):
    validate_adam_args(args)
    if args.adam_beta1 <= 0:
        raise ValueError(f"--adam-beta1 must be in (0, 1) for adamwschedulefree (it interpolates by 1/beta1), got {args.adam_beta1}")
    validate_schedulefree_common(args)


@OPTIMIZERS.register(
    "adamwschedulefree",
    description="Schedule-Free AdamW (Meta schedulefree); evaluation and checkpoints use the averaged weights",
    aliases=("schedulefree-adamw", "sfadamw"),
    arguments=ADAM_ARGS + SCHEDULEFREE_ARGS,
    validate=validate_sf_adamw_args,
    engine=SWITCHES_EVALUATION_WEIGHTS,
    # z (the extra copy of the weights) and exp_avg_sq; the weights x are the model's
    memory=OptimizerMemory(state=constant(2), workspace=elementwise_temporaries(2, 2), notes="z and exp_avg_sq"),
)
def build_sf_adamw(param_groups, args):
    optimizer = _adamw_class()(
        param_groups,
        lr=args.lr,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_eps,
        weight_decay=args.weight_decay,
        warmup_steps=args.schedulefree_warmup_steps,
        r=args.schedulefree_r,
        weight_lr_power=args.schedulefree_weight_lr_power,
        foreach=args.schedulefree_for_each,
    )
    start_in_train_mode(optimizer)
    return optimizer
