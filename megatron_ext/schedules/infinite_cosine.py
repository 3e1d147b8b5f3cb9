"""``infinite-cosine``: cooldown c + (max - c) * (1 + cos(pi * n / T_cd)) / 2 from --lr to
--constant-lr c, then constant c, then the final anneal c * (min/c)^(k/T_ann) to --min-lr (see
``common/infinite.py`` for the phases and their flags)."""
import math

from megatron_ext.schedules import SCHEDULES
from megatron_ext.schedules.common.infinite import INFINITE_ARGS, Infinite


@SCHEDULES.register(
    "infinite-cosine",
    description="cosine cooldown to --constant-lr, hold it, optional final anneal to --min-lr",
    arguments=INFINITE_ARGS,
)
class InfiniteCosine(Infinite):
    def cooldown_lr(self, x):
        s = self.span
        return self.constant_lr + (s.max_lr - self.constant_lr) * 0.5 * (1.0 + math.cos(math.pi * x))
