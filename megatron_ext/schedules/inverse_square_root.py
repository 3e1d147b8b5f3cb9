"""``inverse-square-root``, Megatron's semantics: after warmup W (in samples),
lr = --lr * sqrt(W') / sqrt(max(position, W')) with W' = max(W, 1 sample), floored at --min-lr, and
--min-lr past the decay length. With no warmup W' is one sample, so the LR falls as
1/sqrt(samples) from the first sample on: iteration k+1 (after k*global_batch samples) gets
--lr / sqrt(k * global_batch). Give a warmup to set the time scale."""
import math

from megatron_ext.schedules import SCHEDULES
from megatron_ext.schedules.common.scheduler import DecayStyle


@SCHEDULES.register(
    "inverse-square-root",
    description="--lr * sqrt(warmup / position) after warmup (Megatron), floored at --min-lr",
    aliases=["inv-sqrt", "inverse-sqrt"],
)
class InverseSquareRoot(DecayStyle):
    def lr(self, position):
        s = self.span
        if position > s.decay_end:  # Megatron: past the decay length, min_lr
            return s.min_lr
        w = max(s.warmup, 1.0)
        return max(s.min_lr, s.max_lr * math.sqrt(w) / math.sqrt(max(position, w)))
