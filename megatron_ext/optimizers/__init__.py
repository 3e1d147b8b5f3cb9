"""Optimizer plug-ins (``--optimizer``). One file per optimizer; each registers a builder
``build(param_groups, args) -> torch.optim.Optimizer`` with ``OPTIMIZERS.register``. Param groups
come from ``param_groups.build_param_groups`` and carry ``lr_mult``/``wd_mult`` that the LR
scheduler applies, so schedules and parametrizations work with every optimizer."""
from megatron_ext.registry import Registry

OPTIMIZERS = Registry("optimizer", "optimizers (--optimizer)", package=__name__)
