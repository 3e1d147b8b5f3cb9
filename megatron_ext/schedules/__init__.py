"""LR schedule plug-ins (``--lr-decay-style``). One file per decay style; each registers a
``DecayStyle`` subclass with ``SCHEDULES.register``. The shared machinery (warmup, lengths in
samples, per-group multipliers, checkpoint state) is in ``common/scheduler.py``. Its record's
``validate`` is the class's ``validate_args``."""
from megatron_ext.registry import Registry

SCHEDULES = Registry("lr-schedule", "LR decay styles (--lr-decay-style)", package=__name__,
                     flag="--lr-decay-style", class_validator="validate_args")
