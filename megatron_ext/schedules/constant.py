"""``constant``: hold ``--lr`` after warmup. With ``--lr-constant-plus-cooldown`` (Megatron-DeepSpeed's
``--lr_constant_plus_cooldown``), the LAST ``--lr-constant-plus-cooldown-frac`` of the decay length
(default 0.05 = the final 5%; the decay length defaults to the training length) is a cooldown to
``--min-lr`` shaped by ``--lr-wsd-decay-style`` (default 1-sqrt)."""
from megatron_ext.argtypes import fraction
from megatron_ext.registry import Arg
from megatron_ext.schedules import SCHEDULES
from megatron_ext.schedules.common.stable_cooldown import StableThenCooldown

DEFAULT_COOLDOWN_FRAC = 0.05


@SCHEDULES.register(
    "constant",
    description="hold --lr after warmup; with --lr-constant-plus-cooldown, cool down over the last fraction",
    arguments=[
        Arg("--lr-constant-plus-cooldown", action="store_true", default=False,
            help="end with a cooldown to --min-lr over the last --lr-constant-plus-cooldown-frac of the "
                 "decay length (shape: --lr-wsd-decay-style)"),
        Arg("--lr-constant-plus-cooldown-frac", type=fraction, default=None,
            help=f"the COOLDOWN fraction: the cooldown is the last FRAC of the decay length, warmup included "
                 f"(default {DEFAULT_COOLDOWN_FRAC}); the constant part is the rest after warmup"),
    ],
)
class Constant(StableThenCooldown):
    FIELDS = {"cooldown_start": "--lr-constant-plus-cooldown / --lr-constant-plus-cooldown-frac",
              "cooldown_shape": "--lr-wsd-decay-style"}

    def __init__(self, args, span):
        super().__init__(args, span)
        self.cooldown_start = None
        self.cooldown_shape = None
        if not args.lr_constant_plus_cooldown:
            return
        frac = DEFAULT_COOLDOWN_FRAC if args.lr_constant_plus_cooldown_frac is None else args.lr_constant_plus_cooldown_frac
        self.set_cooldown(args, frac * span.decay_end, f"--lr-constant-plus-cooldown-frac {frac:g}")

    @property
    def USES_DECAY_END(self):  # without a cooldown, the curve does not depend on the length
        return self.cooldown_start is not None

    @staticmethod
    def validate_args(args):
        if args.lr_constant_plus_cooldown_frac is not None and not args.lr_constant_plus_cooldown:
            raise ValueError("--lr-constant-plus-cooldown-frac has no effect without --lr-constant-plus-cooldown")
        if args.lr_constant_plus_cooldown and args.lr_constant_plus_cooldown_frac == 0:
            raise ValueError("--lr-constant-plus-cooldown-frac must be > 0 (it is the cooldown's share of the "
                             "decay length)")
