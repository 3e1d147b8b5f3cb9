"""Shared by ``constant`` (with ``--lr-constant-plus-cooldown``) and ``wsd``: hold ``--lr`` after
warmup, then cool down to ``--min-lr`` over the last part of the decay length, with a shape from
``--lr-wsd-decay-style``. (A private module: the registry skips names starting with ``_``.)"""
from megatron_ext.schedules.common.scheduler import DEFAULT_COOLDOWN_SHAPE, DecayStyle, cooldown_factor


class StableThenCooldown(DecayStyle):
    """``cooldown_start`` (samples, None = no cooldown) and ``cooldown_shape`` define the curve:
    ``max`` until ``cooldown_start``; then ``min + (max - min) * f(x)`` with
    x = (position - cooldown_start) / (decay_end - cooldown_start) and f the shape
    (1-sqrt: 1 - sqrt(x); linear: 1 - x; cosine: (1 + cos(pi x)) / 2); ``min`` from ``decay_end`` on."""

    FIELDS = {"cooldown_start": "", "cooldown_shape": "--lr-wsd-decay-style"}

    def set_cooldown(self, args, length: float, flag: str) -> None:
        """A cooldown of ``length`` samples that ends at the decay end; ``flag`` names its length."""
        s = self.span
        start = s.decay_end - length
        if start < s.warmup - 1e-9:
            raise ValueError(
                f"{flag}: the cooldown ({length:g} samples) and the warmup ({s.warmup:g} samples) do not fit "
                f"in the decay length ({s.decay_end:g} samples) together")
        self.cooldown_start = max(start, s.warmup)
        self.cooldown_shape = getattr(args, "lr_wsd_decay_style", None) or DEFAULT_COOLDOWN_SHAPE

    def lr(self, position):
        s = self.span
        start = self.cooldown_start
        if start is None or position <= start:
            return s.max_lr
        if position >= s.decay_end:
            return s.min_lr
        x = (position - start) / (s.decay_end - start)
        return s.min_lr + (s.max_lr - s.min_lr) * cooldown_factor(self.cooldown_shape, x)

    def phases(self):
        if self.cooldown_start is None:
            return []
        return [("cooldown start", self.cooldown_start), ("cooldown end", self.span.decay_end)]
