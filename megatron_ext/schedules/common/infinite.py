"""Shared by ``infinite-cosine`` and ``infinite-inv-square-root`` (Ibrahim et al., arXiv 2403.08763).
After warmup W, with n = position - W and every fraction taken of the decay length L (warmup
included, like --lr-warmup-fraction):

1. cooldown, T_cd = --lr-cooldown-fraction * L: from --lr to c = --constant-lr (the shape is the
   style's: see ``cooldown_lr``);
2. constant c for T_const = --lr-constant-fraction * L (default: the rest of L, so no anneal);
3. final anneal over what is left, T_ann = L - W - T_cd - T_const: c * (min/c) ** (k / T_ann),
   k = samples into the anneal, reaching --min-lr (> 0) at L; --min-lr after L.

Without an anneal (T_const fills the rest) the LR stays at c for ever, past L too: the run can be
extended and annealed later (resume with --lr-constant-fraction and --override-opt-param-scheduler).
(A private module: the registry skips names starting with ``_``.)"""

from megatron_ext.argtypes import fraction, nonneg_float
from megatron_ext.registry import Arg
from megatron_ext.schedules.common.scheduler import DecayStyle

CONSTANT_LR = Arg("--constant-lr", type=nonneg_float, default=None,
                  help="infinite schedules: the constant LR c after the cooldown, in (--min-lr, --lr]")
COOLDOWN_FRACTION = Arg("--lr-cooldown-fraction", type=fraction, default=None,
                        help="infinite schedules: length of the cooldown from --lr to --constant-lr, as a "
                             "fraction of the decay length (required)")
CONSTANT_FRACTION = Arg("--lr-constant-fraction", type=fraction, default=None,
                        help="infinite schedules: length of the constant phase, as a fraction of the decay "
                             "length; the rest is the final anneal to --min-lr (default: all the rest, no anneal)")
INFINITE_ARGS = (CONSTANT_LR, COOLDOWN_FRACTION, CONSTANT_FRACTION)

_TOLERANCE = 0.5  # samples: lengths within half a sample of each other are equal


class Infinite(DecayStyle):
    FIELDS = {"constant_lr": "--constant-lr", "cooldown_end": "--lr-cooldown-fraction",
              "anneal_start": "--lr-constant-fraction"}

    def __init__(self, args, span):
        super().__init__(args, span)
        style = args.lr_decay_style
        c = args.constant_lr
        if c is None:
            raise ValueError(f"--lr-decay-style {style} needs --constant-lr (the LR after the cooldown)")
        if not span.min_lr < c <= span.max_lr:
            raise ValueError(f"--constant-lr {c:g} must be in (--min-lr {span.min_lr:g}, --lr {span.max_lr:g}]")
        if args.lr_cooldown_fraction is None:
            raise ValueError(f"--lr-decay-style {style} needs --lr-cooldown-fraction (the cooldown's share of "
                             "the decay length)")
        length = span.decay_end
        cooldown = args.lr_cooldown_fraction * length
        used = span.warmup + cooldown
        if used > length + _TOLERANCE:
            raise ValueError(
                f"--lr-cooldown-fraction {args.lr_cooldown_fraction:g}: warmup + cooldown "
                f"({used:g} samples) exceed the decay length ({length:g} samples)")
        self.constant_lr = float(c)
        self.cooldown_end = min(used, length)
        self.anneal_start = None
        if args.lr_constant_fraction is not None:
            used += args.lr_constant_fraction * length
            if used > length + _TOLERANCE:
                raise ValueError(
                    f"--lr-constant-fraction {args.lr_constant_fraction:g}: warmup + cooldown + constant "
                    f"({used:g} samples) exceed the decay length ({length:g} samples)")
            if length - used >= _TOLERANCE:
                self.anneal_start = used
        if self.anneal_start is not None and span.min_lr <= 0:
            raise ValueError(
                f"--min-lr must be > 0 for the final anneal of {style} (c * (min/c)^(k/T) never reaches 0): "
                "set --min-lr, or --lr-constant-fraction so that nothing is left to anneal")

    def cooldown_lr(self, x: float) -> float:
        raise NotImplementedError

    def lr(self, position):
        s = self.span
        c = self.constant_lr
        if position < self.cooldown_end:
            return self.cooldown_lr((position - s.warmup) / (self.cooldown_end - s.warmup))
        if self.anneal_start is None or position <= self.anneal_start:
            return c
        if position >= s.decay_end:
            return s.min_lr
        k = (position - self.anneal_start) / (s.decay_end - self.anneal_start)
        return c * (s.min_lr / c) ** k

    @property
    def USES_DECAY_END(self):
        return self.anneal_start is not None

    def phases(self):
        out = [("cooldown end", self.cooldown_end)]
        if self.anneal_start is not None:
            out += [("anneal start", self.anneal_start), ("anneal end", self.span.decay_end)]
        return out
