"""``linear``: straight line from ``--lr`` to ``--min-lr`` over the decay length."""
from megatron_ext.schedules import SCHEDULES
from megatron_ext.schedules.common.scheduler import DecayStyle


@SCHEDULES.register("linear", description="linear decay from --lr to --min-lr over the decay length")
class Linear(DecayStyle):
    def lr(self, position):
        s = self.span
        return s.max_lr - (s.max_lr - s.min_lr) * s.progress(position)
