"""``infinite-inv-square-root``: cooldown max + (c - max) * h(n / T_cd) / h(1) from --lr to
--constant-lr c with h(x) = 1/sqrt(1 + alpha x) - 1, alpha = --timescale (default 10), then
constant c, then the final anneal c * (min/c)^(k/T_ann) to --min-lr (see ``common/infinite.py``)."""
import math

from megatron_ext.argtypes import finite_float
from megatron_ext.registry import Arg
from megatron_ext.schedules import SCHEDULES
from megatron_ext.schedules.common.infinite import INFINITE_ARGS, Infinite

DEFAULT_TIMESCALE = 10.0


@SCHEDULES.register(
    "infinite-inv-square-root",
    description="inverse-sqrt cooldown to --constant-lr, hold it, optional final anneal to --min-lr",
    aliases=["infinite-inv-sqrt"],
    arguments=INFINITE_ARGS + (
        Arg("--timescale", type=finite_float, default=None,
            help=f"alpha of the inverse-sqrt cooldown h(x) = 1/sqrt(1 + alpha x) - 1 (> 0, default {DEFAULT_TIMESCALE:g})"),
    ),
)
class InfiniteInvSquareRoot(Infinite):
    FIELDS = {**Infinite.FIELDS, "timescale": "--timescale"}

    def __init__(self, args, span):
        super().__init__(args, span)
        self.timescale = DEFAULT_TIMESCALE if args.timescale is None else float(args.timescale)

    @staticmethod
    def validate_args(args):
        if args.timescale is not None and not args.timescale > 0:
            raise ValueError(f"--timescale must be > 0, got {args.timescale:g}")

    def _h(self, x):
        return 1.0 / math.sqrt(1.0 + self.timescale * x) - 1.0

    def cooldown_lr(self, x):
        s = self.span
        return s.max_lr + (self.constant_lr - s.max_lr) * self._h(x) / self._h(1.0)
