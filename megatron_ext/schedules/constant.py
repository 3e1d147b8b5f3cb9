"""``constant``: hold ``--lr`` after warmup."""
from megatron_ext.schedules import SCHEDULES
from megatron_ext.schedules.scheduler import DecayStyle


@SCHEDULES.register("constant", description="hold --lr after warmup")
class Constant(DecayStyle):
    def lr(self, position):
        return self.span.max_lr
