"""The LR scheduler every decay style runs inside.

Positions are counted in SAMPLES, as Megatron-DeepSpeed does: an iteration that starts after
``consumed_samples`` uses ``lr(consumed_samples)``. Lengths given in iterations are multiplied by
the global batch, lengths in tokens divided by the sequence length, so the three units give the
same curve. Warmup is linear from 0 to ``--lr`` and comes first; the decay style owns everything
after it. The LR each param group gets is ``lr * group["lr_mult"]`` and its weight decay
``weight_decay * group["wd_mult"]`` (parametrizations and hybrid optimizers set the multipliers).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from megatron_ext.argtypes import fraction, nonneg_float, nonneg_int, positive_int
from megatron_ext.schedules import SCHEDULES


@dataclasses.dataclass
class ScheduleSpan:
    """Where the phases of a schedule are, in samples."""

    max_lr: float
    min_lr: float
    warmup: float  # warmup ends here
    decay_end: float  # the decay (counted from 0, warmup included) ends here
    train_end: float  # end of training

    def progress(self, position: float) -> float:
        """Fraction of the post-warmup decay done at ``position``, clamped to [0, 1]."""
        length = self.decay_end - self.warmup
        if length <= 0:
            return 1.0
        return min(1.0, max(0.0, (position - self.warmup) / length))


class DecayStyle:
    """Base class of decay-style plug-ins: the LR at any position after warmup."""

    def __init__(self, args, span: ScheduleSpan):
        self.span = span

    def lr(self, position: float) -> float:
        raise NotImplementedError

    def state(self) -> Dict[str, Any]:
        """Style-specific settings that define the curve (saved in checkpoints)."""
        return {}

    @staticmethod
    def validate_args(args) -> None:
        """Raise ValueError (one line naming the flag) for settings this style cannot serve."""


class LRSchedule:
    """Warmup followed by a decay style; a pure function of the position in samples."""

    def __init__(self, span: ScheduleSpan, style_name: str, style: DecayStyle):
        self.span = span
        self.style_name = style_name
        self.style = style

    def lr(self, position: float) -> float:
        s = self.span
        if s.warmup > 0 and position < s.warmup:
            return s.max_lr * position / s.warmup
        return self.style.lr(position)

    def state(self) -> Dict[str, Any]:
        return {"style": self.style_name, **dataclasses.asdict(self.span), **self.style.state()}


def _samples(args, iters=None, samples=None, tokens=None) -> Optional[float]:
    if iters:
        return float(iters * args.global_batch_size)
    if samples:
        return float(samples)
    if tokens:
        return tokens / args.seq_length
    return None


def build_schedule(args) -> LRSchedule:
    """The schedule the flags describe; raises ValueError (one line) if they cannot be served."""
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    train_end = float(args.train_iters * args.global_batch_size)
    given = [f for f in ("iters", "samples", "tokens") if getattr(args, f"lr_decay_{f}")]
    if len(given) > 1:
        raise ValueError(f"give one of --lr-decay-iters/-samples/-tokens, not {' and '.join(given)}")
    decay_end = _samples(args, args.lr_decay_iters, args.lr_decay_samples, args.lr_decay_tokens) or train_end

    warm = [f for f in ("iters", "samples", "tokens") if getattr(args, f"lr_warmup_{f}")]
    if args.lr_warmup_fraction is not None and warm:
        raise ValueError(f"give --lr-warmup-fraction or --lr-warmup-{warm[0]}, not both")
    if len(warm) > 1:
        raise ValueError(f"give one of --lr-warmup-iters/-samples/-tokens, not {' and '.join(warm)}")
    if args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay_end
    else:
        warmup = _samples(args, args.lr_warmup_iters, args.lr_warmup_samples, args.lr_warmup_tokens) or 0.0
    if warmup > decay_end:
        raise ValueError(
            f"warmup ({warmup:g} samples) is longer than the decay length ({decay_end:g} samples)"
        )
    span = ScheduleSpan(args.lr, args.min_lr, warmup, decay_end, train_end)
    plugin = SCHEDULES.get(args.lr_decay_style)
    plugin.obj.validate_args(args)
    return LRSchedule(span, plugin.name, plugin.obj(args, span))


def add_schedule_arguments(g) -> None:
    """The LR flags every decay style shares (a style's own flags live in its plug-in file)."""
    g.add_argument("--lr", type=nonneg_float, default=3e-4)
    g.add_argument("--min-lr", type=nonneg_float, default=0.0)
    g.add_argument("--lr-decay-style", type=SCHEDULES.argument_type, default="cosine",
                   help=f"one of: {', '.join(SCHEDULES.names())}")
    g.add_argument("--lr-decay-iters", type=positive_int, default=None)
    g.add_argument("--lr-decay-samples", type=positive_int, default=None)
    g.add_argument("--lr-decay-tokens", type=positive_int, default=None)
    g.add_argument("--lr-warmup-fraction", type=fraction, default=None,
                   help="warmup as a fraction of the decay length")
    g.add_argument("--lr-warmup-iters", type=nonneg_int, default=0)
    g.add_argument("--lr-warmup-samples", type=nonneg_int, default=0)
    g.add_argument("--lr-warmup-tokens", type=nonneg_int, default=None)


class ParamScheduler:
    """Applies an LRSchedule (and the weight decay) to an optimizer's param groups."""

    def __init__(self, optimizer, schedule: LRSchedule, weight_decay: float):
        self.optimizer = optimizer
        self.schedule = schedule
        self.weight_decay = weight_decay
        self.position = 0.0
        self.current_lr = schedule.lr(0.0)

    def step(self, position: float) -> float:
        """Set every group's LR and weight decay for the iteration starting at ``position``."""
        self.position = position
        lr = self.current_lr = self.schedule.lr(position)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)
        return lr

    def state_dict(self) -> Dict[str, Any]:
        return {"schedule": self.schedule.state(), "weight_decay": self.weight_decay, "position": self.position}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.position = state["position"]
        self.step(self.position)

