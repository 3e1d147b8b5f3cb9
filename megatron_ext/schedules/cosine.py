"""``cosine``: half-cosine from ``--lr`` to ``--min-lr`` over the decay length."""
import math

from megatron_ext.schedules import SCHEDULES
from megatron_ext.schedules.common.scheduler import DecayStyle


@SCHEDULES.register("cosine", description="half-cosine decay from --lr to --min-lr over the decay length")
class Cosine(DecayStyle):
    def lr(self, position):
        s = self.span
        return s.min_lr + (s.max_lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * s.progress(position)))
