"""``wsd``: warmup-stable-decay. Hold ``--lr`` after warmup, then cool down to ``--min-lr`` over
the last part of the decay length: ``--lr-wsd-decay-fraction`` of it (default 0.2) or an absolute
``--lr-wsd-decay-iters|-samples|-tokens``; shape ``--lr-wsd-decay-style`` (1-sqrt, linear, cosine)."""
from megatron_ext.argtypes import fraction, positive_int
from megatron_ext.registry import Arg
from megatron_ext.schedules import SCHEDULES
from megatron_ext.schedules.common.stable_cooldown import StableThenCooldown
from megatron_ext.schedules.common.scheduler import one_of, to_samples

DEFAULT_DECAY_FRACTION = 0.2


@SCHEDULES.register(
    "wsd",
    description="warmup-stable-decay: hold --lr, cool down to --min-lr over the last part (1-sqrt/linear/cosine)",
    aliases=["warmup-stable-decay"],
    arguments=[
        Arg("--lr-wsd-decay-fraction", type=fraction, default=None,
            help=f"the cooldown is the last FRACTION of the decay length, warmup included "
                 f"(default {DEFAULT_DECAY_FRACTION})"),
        Arg("--lr-wsd-decay-iters", type=positive_int, default=None, help="cooldown length in iterations"),
        Arg("--lr-wsd-decay-samples", type=positive_int, default=None, help="cooldown length in samples"),
        Arg("--lr-wsd-decay-tokens", type=positive_int, default=None, help="cooldown length in tokens"),
    ],
)
class WSD(StableThenCooldown):
    FIELDS = {"cooldown_start": "--lr-wsd-decay-fraction/-iters/-samples/-tokens",
              "cooldown_shape": "--lr-wsd-decay-style"}

    def __init__(self, args, span):
        super().__init__(args, span)
        units = one_of(args, "lr-wsd-decay")
        if units:
            length = to_samples(args, args.lr_wsd_decay_iters, args.lr_wsd_decay_samples, args.lr_wsd_decay_tokens)
            flag = f"--lr-wsd-decay-{units[0]}"
        else:
            frac = DEFAULT_DECAY_FRACTION if args.lr_wsd_decay_fraction is None else args.lr_wsd_decay_fraction
            length = frac * span.decay_end
            flag = f"--lr-wsd-decay-fraction {frac:g}"
        self.set_cooldown(args, length, flag)

    @staticmethod
    def validate_args(args):
        given = one_of(args, "lr-wsd-decay", ("fraction", "iters", "samples", "tokens"))
        if len(given) > 1:
            raise ValueError(f"give one of --lr-wsd-decay-fraction/-iters/-samples/-tokens, not "
                             f"{' and '.join('--lr-wsd-decay-' + g for g in given)}")
        if args.lr_wsd_decay_fraction == 0:
            raise ValueError("--lr-wsd-decay-fraction must be > 0 (use --lr-decay-style constant for no cooldown)")
